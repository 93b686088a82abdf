"""Every term of tests/term_cases.py for one step under torchrun (2 processes x batch 8); rank 0 writes JSON."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from transformers import AutoTokenizer  # noqa: E402

from term_cases import CASES, one_step  # noqa: E402


def main(out_path: str, tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    results = {name: one_step(tokenizer, name, str(Path(out_path).parent / f"ddp_{name}"), batch=8)
               for name in CASES}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort an interpreter teardown after the work is written
