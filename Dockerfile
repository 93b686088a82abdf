# GPU image for hf-distill recipes:
#   docker build -t hf-distill .
#   docker run --gpus all -v $PWD/outputs:/app/outputs hf-distill \
#       accelerate launch recipes/distilbert.py --config recipes/configs/distilbert.yaml
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends git libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY hf_distill ./hf_distill
COPY recipes ./recipes
COPY benchmarks ./benchmarks
# The base image's CUDA torch satisfies torch>=2.4, so pip keeps it (no constraints file here:
# constraints.txt pins the CPU build used for development machines).
RUN pip install ".[audio]"

CMD ["accelerate", "launch", "recipes/distilbert.py", "--config", "recipes/configs/distilbert.yaml"]
