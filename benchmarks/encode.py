"""Encoder throughput against the classic notebook loop and sentence-transformers, side by side.

Same model (all-MiniLM-L6-v2), same texts (the first N Debian package
descriptions), one process, methods interleaved round by round; best round
reported. Also: how far the vectors are from the references, and what the
reduced precisions and the ONNX Runtime backend (fp32 and int8, where
onnxruntime is installed) cost in cosine to fp32 and in nDCG@10 on Debian
queries whose answer is among the N documents.

    python benchmarks/encode.py [--documents 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from common import debian_corpus, debian_queries, machine, ndcg_at_10, save

from indexer.encoder import Encoder, load, resolve_model_path
from indexer.settings import DEFAULT_MODEL, IndexSettings


def naive_loop(tokenizer, model, texts: list[str]) -> np.ndarray:
    """The notebooks' loop: input order, pad to the batch's longest, max_length 512, batch 64, mean pooling."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=512, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            parts.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()

    corpus = debian_corpus(args.documents)
    texts = [r["text"] for r in corpus]
    ours = Encoder()
    tokens_256 = sum(len(ids) for ids in ours.tokenize(texts))
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(DEFAULT_MODEL)
    naive_tokenizer, naive_model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    reference = SentenceTransformer(path, device="cpu")
    reduced = {p: Encoder(precision=p) for p in ("bf16", "int8")}
    from indexer.encoder import onnx_backend

    if onnx_backend.available():  # the export is made once per model (needs torch and onnx)
        reduced.update({f"onnx {p}": load(IndexSettings(backend="onnx", precision=p)) for p in ("fp32", "int8")})
    methods = {
        "naive loop (notebooks)": lambda: naive_loop(naive_tokenizer, naive_model, texts),
        "sentence-transformers encode": lambda: reference.encode(texts, batch_size=64, normalize_embeddings=True),
        "indexer fp32 (default)": lambda: ours.encode_texts(texts),
        **{f"indexer {name}": functools.partial(encoder.encode_texts, texts) for name, encoder in reduced.items()},
    }
    best: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, run in methods.items():
            started = time.perf_counter()
            vectors[name] = np.asarray(run())
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)

    fp32 = vectors["indexer fp32 (default)"]
    short = np.array([len(ids) < ours.max_length for ids in ours.tokenize(texts)])
    pairs = debian_queries({r["_id"] for r in corpus}, args.queries)
    ids = [r["_id"] for r in corpus]

    def quality(encoder, doc_vectors: np.ndarray) -> float:
        query_vectors = encoder.encode_texts([q for q, _ in pairs])
        top = np.argsort(-(query_vectors @ doc_vectors.T), axis=1)[:, :10]
        return ndcg_at_10([[ids[i] for i in row] for row in top], [d for _, d in pairs])

    rows = []
    for name, seconds in best.items():
        rows.append({"method": name, "seconds": round(seconds, 2), "docs_per_s": round(len(texts) / seconds, 1), "tokens_per_s": round(tokens_256 / seconds)})
    fp32_seconds = best["indexer fp32 (default)"]
    ratios = {
        "fp32 vs naive loop": best["naive loop (notebooks)"] / fp32_seconds,
        "fp32 vs sentence-transformers": best["sentence-transformers encode"] / fp32_seconds,
        "bf16 vs sentence-transformers": best["sentence-transformers encode"] / best["indexer bf16"],
        **{f"{name} vs torch fp32": fp32_seconds / best[f"indexer {name}"] for name in reduced if name.startswith("onnx")},
    }
    differences = {
        "fp32 vs naive loop, texts under 256 tokens (max abs)": float(np.abs(fp32[short] - vectors["naive loop (notebooks)"][short]).max()),
        "fp32 vs sentence-transformers (max abs)": float(np.abs(fp32 - vectors["sentence-transformers encode"]).max()),
    }
    precision = {"fp32": {"min_cosine": 1.0, "ndcg@10": round(quality(ours, fp32), 4)}}
    for p, encoder in reduced.items():
        cosines = (vectors[f"indexer {p}"] * fp32).sum(axis=1)
        precision[p] = {
            "min_cosine": round(float(cosines.min()), 5),
            "mean_cosine": round(float(cosines.mean()), 5),
            "ndcg@10": round(quality(encoder, vectors[f"indexer {p}"]), 4),
        }

    print(f"{len(texts)} Debian descriptions ({tokens_256} tokens at 256), {machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'method':<32}{'s':>8}{'docs/s':>9}{'tokens/s':>10}")
    for row in rows:
        print(f"{row['method']:<32}{row['seconds']:>8.2f}{row['docs_per_s']:>9.1f}{row['tokens_per_s']:>10}")
    for name, value in ratios.items():
        print(f"speed-up {name}: {value:.2f}x")
    for name, value in differences.items():
        print(f"{name}: {value:.2e}")
    print(f"precision quality on {len(pairs)} Debian queries over these documents:")
    for p, values in precision.items():
        print(f"  {p}: {values}")
    save("encode", {"documents": len(texts), "rows": rows, "ratios": ratios, "differences": differences, "precision": precision})


if __name__ == "__main__":
    main()
