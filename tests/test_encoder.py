"""The encoder, against the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from indexer.encoder import (
    CPU_BATCH_TOKENS,
    CPU_BATCH_TOKENS_MAX,
    BatchBudget,
    Encoder,
    TextTokenizer,
    canonical_model_name,
    flatten,
    length_batches,
    resolve_model_path,
)
from indexer.errors import ModelError
from indexer.settings import DEFAULT_MODEL

TEXTS = [
    "Waterproof hiking boots with a Vibram sole.",
    "A",
    "An espresso machine with a steam wand for frothing milk, fifteen bar pump pressure and a removable water tank "
    "that holds enough for a dozen cups before it needs refilling.",
    "Noise cancelling headphones",
    "Cast iron skillet, pre-seasoned, twelve inches across, for searing and baking.",
]


def hand_mean_pooling(model_path: str, texts: list[str], max_length: int) -> np.ndarray:
    """The textbook formula, written out: one padded batch in input order."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_default_model_loads_offline_with_its_own_limit(encoder):
    assert encoder.model_name == DEFAULT_MODEL
    assert encoder.dimension == 384
    assert encoder.max_length == 256  # sentence_bert_config.json's max_seq_length
    assert encoder.device.type in ("cpu", "cuda", "mps")


def test_vectors_are_unit_length_float32(encoder):
    vectors = encoder.encode_texts(TEXTS)
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_alone_equals_text_in_padded_batch(encoder):
    # All five in one batch, padded to the longest.
    assert encoder.batch_size is None and len(TEXTS) * max(map(len, encoder.tokenize(TEXTS))) <= encoder.batch_tokens
    batch = encoder.encode_texts(TEXTS)
    for i, text in enumerate(TEXTS):
        alone = encoder.encode_texts([text])[0]
        np.testing.assert_allclose(alone, batch[i], atol=1e-5)


def test_results_come_back_in_input_order(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "batch_size", 2)
    forward = encoder.encode_texts(TEXTS)
    backward = encoder.encode_texts(TEXTS[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)
    assert not np.allclose(forward[0], forward[1])


def test_mean_pooling_equals_hand_written_formula(encoder, monkeypatch):
    expected = hand_mean_pooling(resolve_model_path(DEFAULT_MODEL), TEXTS, 256)
    monkeypatch.setattr(encoder, "budget", BatchBudget(64, limit=64))  # several batches of different widths
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), expected, atol=1e-5)


def test_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), expected, atol=1e-5)


def test_long_text_is_truncated_to_max_length(encoder):
    long_text = " ".join(["mountain"] * 400)
    ids = encoder.tokenize([long_text])[0]
    assert len(ids) == 256
    truncated = encoder.tokenizer.decode(ids[1:-1])
    np.testing.assert_allclose(encoder.encode_texts([long_text]), encoder.encode_texts([truncated]), atol=1e-5)


def test_cls_pooling_takes_first_token(tiny_model):
    from transformers import AutoModel, AutoTokenizer

    encoder = Encoder(str(tiny_model), pooling="cls")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        hidden = model(**tokenizer(TEXTS[:1], return_tensors="pt")).last_hidden_state[:, 0].numpy()
    expected = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS[:1]), expected, atol=1e-5)


def test_local_model_folder_limits(tiny_model):
    encoder = Encoder(str(tiny_model), max_length=100)
    assert encoder.dimension == 32
    assert encoder.max_length == 100
    # No sentence_bert_config.json: the limit is the position table (128), below the tokenizer's 512.
    assert Encoder(str(tiny_model)).max_length == 128
    assert canonical_model_name(str(tiny_model)) == str(tiny_model.resolve())


def test_batches_respect_both_limits():
    lengths = np.array([5, 300, 40, 40, 12, 7, 100])
    order = np.argsort(-lengths, kind="stable")
    batches = list(length_batches(order, lengths, batch_size=3, batch_tokens=256))
    assert [b.tolist() for b in batches] == [[1], [6, 2], [3, 4, 5], [0]]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= 256


@pytest.mark.parametrize("precision, min_cosine", [("bf16", 0.999), ("int8", 0.8)])
def test_reduced_precision_stays_close_to_fp32(encoder, precision, min_cosine):
    reduced = Encoder(precision=precision)
    assert reduced.fingerprint == encoder.fingerprint
    assert reduced.embedding.key != encoder.embedding.key
    cosines = (reduced.encode_texts(TEXTS) * encoder.encode_texts(TEXTS)).sum(axis=1)
    assert cosines.min() > min_cosine
    np.testing.assert_allclose(np.linalg.norm(reduced.encode_texts(TEXTS), axis=1), 1.0, atol=1e-5)


def test_the_embedding_identity_checks_itself_and_is_what_segments_record(encoder, sample_index):
    from indexer import layout
    from indexer.settings import Embedding

    embedding = encoder.embedding
    assert embedding == Embedding(encoder.fingerprint, "mean", 256, "fp32", "torch")
    assert embedding.key == f"{encoder.fingerprint}|mean|256|fp32"  # the key indexes were written with so far
    (segment,) = layout.segment_folders(sample_index, layout.read_manifest(layout.version_dir(sample_index, "v000001")))
    assert layout.read_segment_meta(segment).embedding == embedding.key
    for wrong, message in [({"pooling": "max"}, "unknown pooling"), ({"max_length": 0}, "max length"),
                           ({"precision": "fp8"}, "unknown precision"), ({"backend": "tpu"}, "unknown backend")]:
        with pytest.raises(ModelError, match=message):
            Embedding(**{**vars(embedding), **wrong})


def test_empty_input_gives_empty_matrix(encoder):
    assert encoder.encode_texts([]).shape == (0, 384)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "no-such-org/no-such-model"}, "cannot load model 'no-such-org/no-such-model'"),
        ({"pooling": "max"}, "unknown pooling 'max'"),
        ({"max_length": 4096}, "max length must be between 1 and 512"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"),
    ],
)
def test_bad_model_settings_are_user_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        Encoder(**kwargs)


def test_forward_is_the_fastest_of_those_that_match_eager(tiny_model, monkeypatch, tmp_path):
    """On CPU the forward (eager, traced, oneDNN prepacked) is chosen by timing, among those that agree with eager."""
    from indexer.encoder import cpu_kernels as module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no choice remembered from earlier processes

    expected = hand_mean_pooling(str(tiny_model), TEXTS, 128)
    monkeypatch.setattr(module, "_CHOSEN", {})
    chosen = Encoder(str(tiny_model))
    np.testing.assert_allclose(chosen.encode_texts(TEXTS), expected, atol=1e-5)

    # A packed kernel slower than the rest is not chosen. (Each load below remembers nothing from the one before:
    # a packed choice the first load remembered would be taken without timing.)
    exact = module.PackedLinear.forward
    monkeypatch.setattr(module.PackedLinear, "forward", lambda self, x: (time.sleep(0.002), exact(self, x))[1])
    monkeypatch.setattr(module, "_CHOSEN", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "slow"))
    slow = Encoder(str(tiny_model))
    assert not any(isinstance(m, module.PackedLinear) for m in slow.model.modules())

    # One that disagrees with eager is not chosen however fast it is, and the fingerprint is the same.
    monkeypatch.setattr(module.PackedLinear, "forward", lambda self, x: exact(self, x) * 1.01)
    monkeypatch.setattr(module, "_CHOSEN", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fallback"))
    fallback = Encoder(str(tiny_model))
    assert not any(isinstance(m, module.PackedLinear) for m in fallback.model.modules())
    np.testing.assert_allclose(fallback.encode_texts(TEXTS), expected, atol=1e-5)
    assert fallback.fingerprint == chosen.fingerprint


def test_the_choice_is_made_once_per_process_so_vectors_agree_bit_for_bit(tiny_model):
    first, second = Encoder(str(tiny_model)), Encoder(str(tiny_model))
    assert type(first._forward) is type(second._forward) and first.query_threads == second.query_threads
    threads = torch.get_num_threads()
    assert 1 <= first.query_threads <= threads
    assert np.array_equal(first.encode_texts(["one short query"]), second.encode_texts(["one short query"]))
    assert np.array_equal(first.encode_texts(TEXTS * 2), second.encode_texts(TEXTS * 2))
    assert torch.get_num_threads() == threads  # a query's thread count is put back


def test_encoders_of_one_model_share_one_trace(tiny_model, monkeypatch):
    """TorchScript never frees a trace: a second load of the same files takes the first's, not a new copy."""
    from indexer.encoder import cpu_kernels as module

    first = Encoder(str(tiny_model))
    key = module.machine_key(first._path, first._stamp)
    monkeypatch.setitem(module._CHOSEN, key, ("traced", first.query_threads))  # traced, whatever timing chose
    monkeypatch.setattr(module, "_TRACES", {})
    traced, again = Encoder(str(tiny_model)), Encoder(str(tiny_model))
    assert isinstance(traced._forward, torch.jit.ScriptModule) and again._forward is traced._forward
    assert again._unmasked is traced._unmasked and len(module._TRACES) == 2  # with mask and without
    np.testing.assert_allclose(again.encode_texts(TEXTS), first.encode_texts(TEXTS), atol=1e-5, rtol=0)


def test_batches_side_by_side_give_the_same_vectors_whatever_the_worker_count(tiny_model):
    """On CPU each batch runs on one thread, so the number of workers (cores) changes no bit of any vector."""
    encoder = Encoder(str(tiny_model), batch_tokens=256)  # many batches
    texts = [f"text {i} " + "about boots and coffee, " * (i % 17) for i in range(300)]
    threads = torch.get_num_threads()
    found = {}
    for workers in (4, 2, 1):
        encoder.workers = workers
        found[workers] = encoder.encode_texts(texts)
        assert torch.get_num_threads() == threads
    assert found[4].tobytes() == found[2].tobytes()
    # One worker: every thread on each batch, one batch after another (bits may differ with the thread count).
    np.testing.assert_allclose(found[1], found[2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(found[2][:5], np.vstack([encoder.encode_texts([t]) for t in texts[:5]]), atol=1e-6, rtol=0)


def test_batches_side_by_side_share_the_token_limit(tiny_model):
    """Memory in flight stays that of one budget-limit batch whatever the number of cores (workers)."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            encoder = Encoder(str(tiny_model))
            assert encoder.workers == count
            assert encoder.budget.limit == max(CPU_BATCH_TOKENS, CPU_BATCH_TOKENS_MAX // count)
    finally:
        torch.set_num_threads(threads)
    assert Encoder(str(tiny_model), batch_tokens=4096).budget.limit == 4096  # a budget given is kept as given


@pytest.mark.process
def test_later_processes_use_the_remembered_choice(tiny_model, tmp_path):
    """The choice is remembered on disk per model, torch, CPU and thread count; a new process reads it instead of timing."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    show = (f"from indexer.encoder import Encoder; e = Encoder({str(tiny_model)!r}); "
            "print(getattr(e._forward, '__name__', type(e._forward).__name__), e.query_threads)")
    first = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True).stdout.split()
    choices_file = tmp_path / "indexer" / "forwards.json"
    (key, choice), = json.loads(choices_file.read_text()).items()
    assert choice[1] == int(first[1]) and {"_eager_forward": "eager"}.get(first[0], choice[0]) == choice[0]
    choices_file.write_text(json.dumps({key: ["eager", 1]}))
    again = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert again == ["_eager_forward", "1"]


def test_query_threads_are_the_count_that_measured_fastest(monkeypatch):
    from indexer.encoder import cpu_kernels as module

    counts = [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: counts[-1])
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    # On one thread this "query" takes 1 ms, on two 10 ms: one thread is chosen, and the count is restored.
    assert module.fastest_threads(lambda: time.sleep(0.001 if counts[-1] == 1 else 0.01)) == 1
    assert counts == [2, 1, 2, 2, 2]


def test_batch_budget_doubles_while_throughput_improves_then_keeps_the_best():
    budget = BatchBudget(1024, limit=32768)
    # tokens/s by budget: better up to 4096, worse at 8192
    rates = {1024: 1000.0, 2048: 1500.0, 4096: 1700.0, 8192: 1650.0}
    while not budget.settled:
        budget.record(int(rates[budget.tokens] * BatchBudget.MEASURE_SECONDS), BatchBudget.MEASURE_SECONDS)
    assert budget.tokens == 4096
    budget.record(1, 100.0)  # settled: later timings change nothing
    assert budget.tokens == 4096


def test_batch_budget_given_by_the_user_never_changes():
    budget = BatchBudget(512, limit=512)
    assert budget.settled
    budget.record(10**6, 1.0)
    assert int(budget) == 512


@pytest.mark.parametrize("lowercase", [True, False])
def test_ascii_texts_tokenise_as_the_whole_tokenizer(tiny_model, tmp_path, lowercase):
    # ASCII texts skip the Rust normalizer (Python drops control characters and lowercases): every ASCII
    # character, in mixes with non-ASCII texts and past the truncation, gives the tokenizer's own ids.
    import random
    import shutil

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {**spec["normalizer"], "lowercase": lowercase}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())  # transformers sets lowercasing from here
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": lowercase}))
    encoder = Encoder(str(folder))
    normalizer = json.loads(encoder.tokenizer.backend_tokenizer.to_str())["normalizer"]
    assert normalizer["lowercase"] == lowercase
    rng = random.Random(7)
    ascii = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(ascii) for _ in range(rng.randint(0, 300))) for _ in range(300)]
    texts += ["".join(rng.choice("aB \t\n\r\x0b\x0c\x1c\x1f\x7f\x00.,-") for _ in range(40)) for _ in range(300)]
    texts += ["Naïve Café\tAU\x00LAIT", "日本語 text", "Plain ASCII Words. " * 40, ""]
    rng.shuffle(texts)
    expected = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    assert encoder.tokenize(texts) == expected
    assert encoder.tokenize([t for t in texts if t.isascii()]) == [ids for t, ids in zip(texts, expected) if t.isascii()]


def test_uniform_batches_stop_where_their_first_length_does():
    lengths = np.array([5, 300, 40, 40, 12, 7, 100, 40, 40])
    order = np.argsort(-lengths, kind="stable")
    batches = [b.tolist() for b in length_batches(order, lengths, batch_size=6, batch_tokens=256, uniform=True)]
    # 100 fills no half of a 2-text batch with itself alone: it runs alone; four 40s fill 4 of 6; the rest mix.
    assert batches == [[1], [6], [2, 3, 7, 8], [4, 5, 0]]
    assert [b.tolist() for b in length_batches(order, lengths, 6, 256)] == [[1], [6, 2], [3, 7, 8, 4, 5, 0]]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_text_embeds_alike_with_its_own_length_unmasked_and_among_longer_ones_masked(tiny_model, pooling):
    encoder = Encoder(str(tiny_model), pooling=pooling, batch_tokens=4096)
    if encoder._unmasked is None:  # timing chose the packed model, which always takes a mask: run eager's two forms
        encoder._forward, encoder._unmasked = encoder._eager_forward, encoder._eager_unmasked
    same = ["one two three four five", "six seven eight nine ten"]  # five words, one token each
    flat, starts, lengths = flatten(encoder.tokenize(same))
    assert lengths.min() == lengths.max() and encoder._pad(flat, starts, lengths)[1] is None  # runs unmasked
    alone = encoder.encode_texts(same)
    mixed = encoder.encode_texts([*same, "a longer text that pads the other two in one batch with an attention mask"])
    np.testing.assert_allclose(alone, mixed[:2], atol=1e-6)
    assert not np.array_equal(encoder.encode_texts(same[:1]), encoder.encode_texts(same[1:]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_sdpa_model_given_its_mask_as_sdpa_takes_it_embeds_as_with_the_plain_mask(tiny_model, precision):
    """On CPU a padded batch goes to an SDPA model with a [batch, 1, 1, width] boolean mask (transformers builds none then)."""
    encoder = Encoder(str(tiny_model), precision=precision)
    assert encoder._mask_form == "row"
    input_ids, attention_mask = encoder._pad(*flatten(encoder.tokenize(TEXTS)))
    with torch.inference_mode(), encoder._autocast():
        plain = encoder._vectors(encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)
        for forward in {encoder._eager_forward, encoder._forward}:  # the chosen forward may be a trace or the packed model
            np.testing.assert_allclose(encoder._vectors(forward(input_ids, attention_mask), attention_mask), plain, atol=1e-5)


def test_an_encoder_takes_a_tokenizer_loaded_for_its_model_and_max_length_only(tiny_model):
    tokenizer = TextTokenizer(str(tiny_model), 16)
    encoder = Encoder(str(tiny_model), max_length=16, tokenizer=tokenizer)
    assert encoder.text is tokenizer and encoder.max_length == 16
    assert encoder.tokenize(["a text that runs well past sixteen tokens " * 4]) == tokenizer.tokenize(["a text that runs well past sixteen tokens " * 4])
    with pytest.raises(ModelError, match="tokenizer given"):
        Encoder(str(tiny_model), tokenizer=tokenizer)
