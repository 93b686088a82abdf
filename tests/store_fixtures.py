"""Pseudo-label stores written by an earlier release (``tests/data/pseudo_label_v1``), moved to where a test
rebuilt their inputs.

The stores were made by the labellers as they were before ``hf_distill.speech.labelling`` (the standard and
the packed one) on inputs the tests rebuild exactly: :func:`build_inputs` (tiny teachers from fixed seeds,
clips from a fixed seed). Their paths are written relative to ``FIXTURE_ROOT``; :func:`rebase_store` moves a
store to another root, recomputing the configuration and item hashes with the store format's own formulas
(``sha256_json`` of format, version, configuration and teacher fingerprint; SHA-256 of the item lines), not
with the labeller's code, so that a labeller whose hashing drifted cannot resume them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

DATA = Path(__file__).parent / "data" / "pseudo_label_v1"
FIXTURE_ROOT = "/fixture"
CLIP_DURATIONS = [1.0, 2.5, 0.7, 12.0, 35.0, 3.2]
CLIP_SEED = 11
#: how each store was made (``PseudoLabelConfig`` fields besides input, model and output_dir)
STORES = {
    "ctc_topk": dict(teacher="ctc", top_k=3, batch_size=2, shard_size=3, chunk_length_s=4.0, chunk_overlap_s=1.0),
    "whisper_topk": dict(teacher="whisper", top_k=4, max_new_tokens=5, batch_size=3, shard_size=3),
    "whisper_packed": dict(teacher="whisper", pack=True, max_new_tokens=5, batch_size=3, shard_size=3),
    # unpacked, without soft labels: made when that was the default; resumed with packing left to its default
    "whisper_plain": dict(teacher="whisper", pack=None, max_new_tokens=5, batch_size=3, shard_size=3),
}
#: whether each store is packed (what the resumed run must keep)
PACKED = {"ctc_topk": False, "whisper_topk": False, "whisper_packed": True, "whisper_plain": False}


def build_inputs(root: Path) -> Path:
    """The teachers (``root/ctc``, ``root/whisper``) and clips (``root/clips``) the stores were made from."""
    from test_pseudo_label import build_tiny_ctc, build_tiny_whisper, write_clips

    build_tiny_ctc(root / "ctc")
    build_tiny_whisper(root / "whisper")
    write_clips(root / "clips", CLIP_DURATIONS, seed=CLIP_SEED)
    return root


def items_hash(lines: list[tuple[str, str, str | None]]) -> str:
    h = hashlib.sha256()
    for item_id, path, reference in lines:
        h.update(f"{item_id}\t{path}\t{reference if reference is not None else chr(0)}\n".encode("utf-8"))
    return h.hexdigest()


def rebase_store(src: Path, dst: Path, old_root: str, new_root: str) -> Path:
    """Copy the store ``src`` to ``dst`` with every path under ``old_root`` moved under ``new_root`` (whose
    teacher folder is hashed anew)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_distill.speech.audio import list_audio
    from hf_distill.store.manifest import sha256_json, teacher_fingerprint
    from hf_distill.store.writer import read_shard_metadata, shard_files, write_shard

    shutil.copytree(src, dst)
    for name in ("manifest.json", "failures.jsonl"):
        (dst / name).write_text((src / name).read_text().replace(old_root, new_root))
    manifest = json.loads((dst / "manifest.json").read_text())
    cfg = manifest["config"]
    manifest["teacher"]["fingerprint"] = fingerprint = teacher_fingerprint(cfg["model"])
    manifest["config_hash"] = sha256_json({"format": manifest["format"], "version": manifest["version"],
                                           "config": cfg, "teacher": fingerprint})
    listed = cfg["input"] if Path(cfg["input"]).exists() else cfg["input"].replace(new_root, old_root)
    items = [(it.id, it.path.replace(old_root, new_root), it.reference) for it in list_audio(listed)]
    manifest["items_hash"] = items_hash(items)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    size = manifest["shard_size"]
    for path in shard_files(src):
        i = int(Path(path).name[6:11])
        table = pq.read_table(path)
        paths = pa.array([p.replace(old_root, new_root) for p in table["path"].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("path"), "path", paths)
        meta = json.loads(json.dumps(read_shard_metadata(path)).replace(old_root, new_root))
        meta.update(config_hash=manifest["config_hash"], items_hash=items_hash(items[i * size:(i + 1) * size]))
        write_shard(dst / Path(path).name, table, meta, i)
    return dst
