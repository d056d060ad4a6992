"""The evaluation tasks against references computed here: perplexity (truncated, sliding, buckets, last-k,
one shared forward), passkey and needle prompts, greedy decoding, Wilson intervals, and one real-model run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import ARCHS, tiny_model
from transformers import DynamicCache

from lctx import data, engine, evals, patches
from lctx.engine import Engine, EngineError
from lctx.evals import Cell, TaskError, passkey, ppl
from lctx.evals.filler import FILLER
from lctx.stats import accuracy_metrics, wilson

TOPICS = ("assert", "attribute-access", "comparisons", "customization", "for", "identifiers")


def corpus_dir(root: Path, sizes: dict[str, int]) -> Path:
    """Files named by ``sizes`` keys, each the first ``size`` characters of some manual topics (plain prose)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in TOPICS)
    folder = root / "docs"
    folder.mkdir(exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        (folder / f"{name}.txt").write_text(text[i * 500:i * 500 + size])
    return folder


def make(spec: str, **params) -> evals.Task:
    """The task a spec names, with run-wide parameters (as --samples etc. give them)."""
    (task,) = evals.resolve(spec, params)
    return task


def engine_of(loaded, prefill_chunk: int | None = None, batch_size: int = 1) -> Engine:
    return Engine.from_loaded(loaded, prefill_chunk=prefill_chunk, batch_size=batch_size)


def resolved(text: str, train_len: int) -> patches.RopeSpec:
    return patches.parse(text).resolve(train_len)


def plain_nll(model, ids: list[int]) -> torch.Tensor:
    """Reference: cross-entropy of ``model(ids).logits`` against the next tokens, per position (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()


def long_docs(tokenizer, folder: Path, length: int, samples: int) -> tuple[list[tuple[str, list[int]]], int]:
    """Reference selection: files in name order, tokenized as is; the first ``samples`` with ``length`` tokens."""
    chosen, skipped = [], 0
    for path in sorted(folder.glob("*.txt")):
        ids = tokenizer(path.read_text()).input_ids
        if len(ids) >= length:
            chosen.append((path.name, ids))
        else:
            skipped += 1
        if len(chosen) == samples:
            break
    return chosen, skipped


def no_report(cost: float) -> None:
    pass


# ---- perplexity --------------------------------------------------------------------------------------------


def test_ppl_is_exp_of_token_weighted_mean_nll_and_skips_short_documents(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a-short": 60, "b": 900, "c": 1500, "d": 2000})
    task = make("ppl", data=str(folder), samples=2)
    length = 160
    (outcome,) = task.run(engine_of(tiny), resolved("none", 256), [Cell(length)], no_report).values()

    docs, skipped = long_docs(tiny.tokenizer, folder, length, 2)
    assert [name for name, _ in docs] == ["b.txt", "c.txt"] and skipped == 1
    nlls = [plain_nll(tiny.model, ids[:length]) for _, ids in docs]
    total, tokens = sum(float(n.sum()) for n in nlls), sum(n.numel() for n in nlls)
    assert tokens == 2 * (length - 1)  # L − 1 predicted tokens per document
    assert outcome.metrics["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert outcome.metrics["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert outcome.metrics["tokens"] == tokens
    for sample, nll in zip(outcome.samples, nlls, strict=True):
        assert sample["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    bos = tiny.tokenizer.bos_token_id
    assert all(ids[0] == bos for _, ids in docs)  # the tokenizer adds a BOS: it is the first of the L tokens
    assert outcome.data["bos_added"] is True and outcome.data["bos_ids"] == [bos]
    assert outcome.data["documents"] == ["b.txt", "c.txt"] and outcome.data["skipped_short"] == 1
    assert outcome.data["samples_used"] == 2 and outcome.data["id"].startswith(f"{folder}@")
    assert outcome.notes == ["1 document(s) shorter than 160 tokens skipped"]

    fewer = make("ppl", data=str(folder), samples=5)
    (short,) = fewer.run(engine_of(tiny), resolved("none", 256), [Cell(length)], no_report).values()
    assert short.data["samples_used"] == 3
    assert "only 3 of 5 requested documents have 160 tokens" in short.notes


def test_position_buckets_and_last_k(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a": 1200, "b": 1400})
    length, last_k = 200, 50
    task = make("ppl", data=str(folder), samples=2, last_k=last_k)
    (outcome,) = task.run(engine_of(tiny), resolved("none", 256), [Cell(length)], no_report).values()

    docs, _ = long_docs(tiny.tokenizer, folder, length, 2)
    nll = torch.cat([plain_nll(tiny.model, ids[:length]) for _, ids in docs])
    position = torch.arange(1, length).repeat(2).double()  # position of each predicted token in its window
    metrics = outcome.metrics
    assert metrics["bucket_edges"] == [0, 25, 50, 75, 100, 125, 150, 175, 200]
    for b in range(8):
        inside = (position >= b * length / 8) & (position < (b + 1) * length / 8)
        assert metrics["bucket_nll"][b] == pytest.approx(float(nll[inside].mean()), rel=1e-5)
    last = position >= length - last_k
    assert int(last.sum()) == 2 * last_k == metrics["last_k_tokens"]
    assert metrics["last_k_nll"] == pytest.approx(float(nll[last].mean()), rel=1e-5)
    assert metrics["last_k_ppl"] == pytest.approx(math.exp(float(nll[last].mean())), rel=1e-5)
    assert ppl.bucket_edges(100) == [0, 13, 25, 38, 50, 63, 75, 88, 100]  # ceil(b·L/8): [edges[b], edges[b+1])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_lm_head_equals_the_models_logits(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    lean = engine.token_nll(model, ids, chunk=7)  # 7 rows at a time: several chunks and a ragged last one
    assert torch.allclose(lean.double(), plain_nll(model, ids), rtol=1e-5, atol=1e-6)
    engine.check_head(model, ids)


def test_check_head_refuses_a_model_that_rescales_its_logits() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("cohere", vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, logit_scale=0.25)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(EngineError, match="CohereForCausalLM's own logits.*would be wrong"):
        engine.check_head(model, list(range(3, 40)))


@pytest.mark.parametrize("rope", ["none", "pi:factor=2", "yarn:factor=2", "rerope"])
def test_one_forward_for_all_lengths_equals_one_run_per_length(tiny, tmp_path, rope: str) -> None:
    folder = corpus_dir(tmp_path, {"a": 800, "b": 1500})
    task, spec, run = make("ppl", data=str(folder), samples=2, last_k=40), resolved(rope, 256), engine_of(tiny)
    cells = [Cell(96), Cell(200), Cell(320)]  # 320 is past the training length
    assert task.groups(spec, cells) == [cells]
    together = task.run(run, spec, cells, no_report)
    for cell in cells:
        (alone,) = task.run(run, spec, [cell], no_report).values()
        shared = together[cell]
        assert shared.extra == {"shared_forward": [96, 200, 320]} and alone.extra == {}
        for name in ("ppl", "last_k_ppl"):
            assert shared.metrics[name] == pytest.approx(alone.metrics[name], rel=1e-5)
        assert shared.metrics["bucket_nll"] == pytest.approx(alone.metrics["bucket_nll"], rel=1e-5)


def test_dynamic_variants_run_each_length_on_its_own(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a": 1500})
    task, spec, run = make("ppl", data=str(folder)), resolved("dynamic-ntk:factor=2", 256), engine_of(tiny)
    cells = [Cell(200), Cell(320)]
    assert task.groups(spec, cells) == [[Cell(200)], [Cell(320)]]
    (dynamic,) = task.run(run, spec, [Cell(200)], no_report).values()
    (plain,) = task.run(run, resolved("none", 256), [Cell(200)], no_report).values()
    assert dynamic.metrics["ppl"] == pytest.approx(plain.metrics["ppl"], rel=1e-6)  # within L: unscaled
    ids = long_docs(tiny.tokenizer, folder, 320, 1)[0][0][1]
    with patches.apply(tiny.model, spec):  # a shared forward at 320 would score the 200-token prefix differently
        prefix = engine.token_nll(tiny.model, ids[:320])[:199]
        own = engine.token_nll(tiny.model, ids[:200])
    assert (prefix - own).abs().max() > 1e-3
    assert dynamic.samples[0]["nll_sum"] == pytest.approx(float(own.double().sum()), rel=1e-6)


def test_sliding_window_against_a_labels_masked_reference(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a": 1500})
    window, stride = 128, 48
    task = make("ppl", data=str(folder), stride=stride, last_k=32)
    task.check_lengths([window])
    assert task.groups(resolved("none", 256), [Cell(window), Cell(200)]) == [[Cell(window)], [Cell(200)]]
    (outcome,) = task.run(engine_of(tiny), resolved("none", 256), [Cell(window)], no_report).values()

    ids = torch.tensor(long_docs(tiny.tokenizer, folder, window, 1)[0][0][1])
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):  # the recipe of the transformers perplexity guide
        end = min(begin + window, len(ids))
        target = end - previous_end  # tokens this window is the first to score
        inputs = ids[begin:end]
        labels = inputs.clone()
        labels[:-target] = -100
        with torch.no_grad():
            logits = tiny.model(inputs[None]).logits[0, :-1]
        nll = F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[1:] != -100).sum())
        previous_end = end
        if end == len(ids):
            break
    assert count == len(ids) - 1  # every token after the first is scored exactly once
    assert outcome.metrics["tokens"] == count
    assert outcome.metrics["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert outcome.samples[0]["doc_tokens"] == len(ids)

    with engine_of(tiny).session(resolved("none", 256)) as session:
        nll, positions = ppl.sliding_nll(session, ids, window, stride)
    assert nll.double().sum() == pytest.approx(total, rel=1e-5)
    assert positions[:window - 1].tolist() == list(range(1, window))  # first window: all its tokens
    assert positions[window - 1:].min() >= window - stride  # later ones: at least window − stride of context
    assert outcome.metrics["last_k_tokens"] == int((positions >= window - 32).sum())
    with pytest.raises(TaskError, match=r"ppl: stride=300 must be at most each length \(shortest: 128\)"):
        make("ppl", stride=300).check_lengths([128, 512])


def test_no_document_long_enough_names_the_longest(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a": 300, "b": 500})
    longest = max(len(tiny.tokenizer((folder / f).read_text()).input_ids) for f in ("a.txt", "b.txt"))
    with pytest.raises(data.DataError, match=rf"has 1024 tokens: the longest has {longest} tokens .*≤ {longest}"):
        make("ppl", data=str(folder)).check(engine_of(tiny), [Cell(256), Cell(1024)])


# ---- passkey and niah --------------------------------------------------------------------------------------


def test_wilson_interval_against_hand_computed_values() -> None:
    z2 = 1.959963984540054 ** 2
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    low, high = wilson(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 5) == pytest.approx((0.0, z2 / (5 + z2)))  # closed forms at the extremes
    assert wilson(5, 5) == pytest.approx((5 / (5 + z2), 1.0))
    assert wilson(0, 0) == (0.0, 1.0)
    assert accuracy_metrics(8, 10) == {"accuracy": 0.8, "ci_low": low, "ci_high": high, "correct": 8,
                                               "trials": 10}


def test_passkey_prompts_are_exact_seeded_and_put_the_key_at_the_depth(tiny) -> None:
    task = make("passkey", seed=3, samples=3)
    ctx = engine_of(tiny)
    head, needle_text, tail = task.fixed_ids(ctx)
    unit = data.encode(tiny.tokenizer, " " + FILLER, special=False)
    assert head[0] == tiny.tokenizer.bos_token_id
    depths = (0.0, 0.25, 0.5, 1.0)
    tight = next(n for n in range(100, 400) if fits(task, ctx, [Cell(n, d) for d in depths]))
    with pytest.raises(TaskError, match=f"length {tight - 1} is too short; the prompt without filler"):
        task.check(ctx, [Cell(tight - 1, d) for d in depths])
    for length in (tight, 200, 333):
        for depth in depths:
            for trial in range(3):
                prompt = task.build_prompt(ctx, length, depth, trial)
                assert len(prompt.ids) == length
                assert len(prompt.value) == 5 and prompt.value.isdigit()
                assert prompt.ids[:len(head)] == head and prompt.ids[len(prompt.ids) - len(tail):] == tail
                needle = data.encode(tiny.tokenizer, needle_text.format(value=prompt.value), special=False)
                at = prompt.needle_start
                assert prompt.ids[at:at + len(needle)] == needle
                filler = prompt.ids[len(head):at] + prompt.ids[at + len(needle):length - len(tail)]
                offset = prompt.filler["offset"]
                assert filler == (unit * (length // len(unit) + 2))[offset:offset + len(filler)]
                assert (offset + prompt.insert_at) % len(unit) == 0 or prompt.insert_at in (0, len(filler))
                assert abs(prompt.insert_at - depth * len(filler)) <= len(unit) / 2
                if depth == 0:
                    assert at == len(head)  # right after the instruction
                if depth == 1:
                    assert at + len(needle) == length - len(tail)  # right before the question
                assert task.build_prompt(ctx, length, depth, trial) == prompt
    other_run = make("passkey", seed=3, samples=9)  # other options, same seed: same prompts
    assert other_run.build_prompt(engine_of(tiny), 200, 0.5, 1) == task.build_prompt(ctx, 200, 0.5, 1)
    values = {make("passkey", seed=s).build_prompt(ctx, 200, 0.5, 0).value for s in range(6)}
    assert len(values) == 6  # the seed changes the keys
    prompt = task.build_prompt(ctx, 333, 0.5, 0)
    text = tiny.tokenizer.decode(prompt.ids)
    assert text.count(f"The pass key is {prompt.value}. Remember it. {prompt.value} is the pass key.") == 1
    assert text.endswith("\nWhat is the pass key? The pass key is")


def fits(task: passkey.RetrievalTask, ctx: Engine, cells: list[Cell]) -> bool:
    try:
        task.check(ctx, cells)
    except TaskError:
        return False
    return True


def test_greedy_with_the_cache_equals_recomputation(tiny) -> None:
    ids = make("passkey").build_prompt(engine_of(tiny), 200, 0.5, 0).ids
    expected, sequence = [], list(ids)
    with torch.no_grad():
        for _ in range(6):
            token = int(tiny.model(torch.tensor([sequence])).logits[0, -1].argmax())
            expected.append(token)
            sequence.append(token)
    assert engine.greedy(tiny.model, ids, 6, stop_ids=set()) == expected
    assert engine.greedy(tiny.model, ids, 6, stop_ids={expected[0]}) == expected[:1]
    assert passkey.first_number(" 12345. Remember 678") == "12345" and passkey.first_number("none") is None


def test_passkey_scores_trials_by_the_first_number(tiny, monkeypatch) -> None:
    task, ctx = make("passkey", samples=3, seed=1), engine_of(tiny)
    cell = Cell(200, 0.5)
    values = [task.build_prompt(ctx, 200, 0.5, t).value for t in range(3)]
    answers = iter([f" {values[0]}. The", " 123", f"\n{values[2]}\n"])
    monkeypatch.setattr(tiny.tokenizer, "decode", lambda ids, **kw: next(answers))  # what the model "said"
    outcome = task.run(ctx, resolved("none", 256), [cell], no_report)[cell]
    assert [t["correct"] for t in outcome.samples] == [True, False, True]
    assert [t["answer"] for t in outcome.samples] == [values[0], "123", values[2]]
    assert outcome.metrics["accuracy"] == pytest.approx(2 / 3)
    assert (outcome.metrics["ci_low"], outcome.metrics["ci_high"]) == wilson(2, 3)
    assert all(t["prompt_tokens"] == 200 for t in outcome.samples)


def test_niah_haystack_prompts_and_needle_validation(tiny, tmp_path) -> None:
    folder = corpus_dir(tmp_path, {"a": 2000, "b": 2500, "c": 3000})
    task = make("niah", data=str(folder), seed=2, needle="The code word is {value}.",
                question="What is the code word? The code word is")
    ctx = engine_of(tiny)
    stream = data.token_stream(task.corpus, tiny.tokenizer, 10 ** 9).ids
    _, needle_text, tail = task.fixed_ids(ctx)
    for depth in (0.0, 0.5, 1.0):
        prompt = task.build_prompt(ctx, 300, depth, 0)
        assert len(prompt.ids) == 300 and len(prompt.value) == 7
        needle = data.encode(tiny.tokenizer, needle_text.format(value=prompt.value), special=False)
        assert prompt.ids[prompt.needle_start:prompt.needle_start + len(needle)] == needle
        offset = prompt.filler["offset"]
        before = prompt.ids[prompt.needle_start - prompt.insert_at:prompt.needle_start]
        after = prompt.ids[prompt.needle_start + len(needle):300 - len(tail)]
        assert before + after == stream[offset:offset + prompt.filler_tokens]  # real text, read from the offset
        if 0 < prompt.insert_at < prompt.filler_tokens:  # the needle follows the end of a sentence
            assert tiny.tokenizer.decode(before[-1:]).rstrip(" ").endswith((".", "!", "?", "\n"))
    assert "The code word is" in tiny.tokenizer.decode(task.build_prompt(ctx, 300, 0.5, 0).ids)
    # a cell's prompts do not depend on which longer cells were built first in the same context
    fresh, later = make("niah", data=str(folder), seed=2), make("niah", data=str(folder), seed=2)
    later.check(engine_of(tiny), [Cell(2000, 0.5)])
    assert fresh.build_prompt(engine_of(tiny), 300, 0.5, 1) == later.build_prompt(engine_of(tiny), 300, 0.5, 1)
    with pytest.raises(data.DataError, match=r"haystack needs \d+ tokens but .* has only \d+"):
        fresh.check(ctx, [Cell(10 ** 6, 0.5)])
    for bad, message in (("no placeholder", "must contain {value}"), ("{value} and {other}", "only {value}")):
        with pytest.raises(TaskError, match=message):
            make("niah", needle=bad)


# ---- the real model ----------------------------------------------------------------------------------------


def test_smollm2_perplexity_and_passkey_within_its_training_length(smollm2) -> None:
    """SmolLM2-135M on the Python manual: sensible perplexity that context lowers, exact against the model's
    own logits, and the unpatched model retrieves a pass key at 512 tokens."""
    task, run = make("ppl", samples=1, last_k=128), engine_of(smollm2)
    spec = resolved("none", smollm2.train_len)
    outcomes = task.run(run, spec, [Cell(512), Cell(1024)], no_report)
    short, long = outcomes[Cell(512)].metrics, outcomes[Cell(1024)].metrics
    assert 3 < short["ppl"] < 60 and 3 < long["ppl"] < 60
    ids = data.select(task.corpus, smollm2.tokenizer, 512, 1).docs[0][1][:512]
    assert short["ppl"] == pytest.approx(math.exp(float(plain_nll(smollm2.model, ids).mean())), rel=1e-4)
    buckets = long["bucket_nll"]
    assert sum(buckets[4:]) / 4 < buckets[0]  # later tokens, with more context, are easier to predict

    cell = Cell(512, 0.5)
    outcome = make("passkey", samples=2, seed=0).run(run, spec, [cell], no_report)[cell]
    assert outcome.metrics["correct"] == 2, [t["output"] for t in outcome.samples]


CHUNKED_SPECS = ["none", "pi:factor=4", "yarn:factor=4", "dynamic-ntk:factor=4", "ntk:factor=4:logn=true",
                 "rerope:window=16", "leaky-rerope:window=16:k=4", "self-extend:window=16:group=4"]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "gpt_neox"])
def test_chunked_prefill_equals_one_forward(arch: str) -> None:
    """Prompt fed through the cache 13 tokens at a time: same last logits and same greedy answer as one forward."""
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    for spec in CHUNKED_SPECS:
        with patches.apply(model, spec, train_len=64, seq_len=len(ids) + 6):
            whole = engine.prefill(model, ids).logits[0, -1]
            chunked = engine.prefill(model, ids, chunk=13).logits[0, -1]
            assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5), (arch, spec, (chunked - whole).abs().max())
            assert engine.greedy(model, ids, 6, set(), prefill_chunk=13) == engine.greedy(model, ids, 6, set())


def test_passkey_cell_with_prefill_chunks_records_the_same_trials(tiny) -> None:
    task, cell = make("passkey", samples=2), Cell(300, 0.5)
    widths: list[int] = []
    hook = tiny.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                with_kwargs=True)
    try:
        outcomes = []
        for chunk in (None, 64):
            widths.clear()
            outcomes.append(task.run(engine_of(tiny, chunk), resolved("rerope:window=32", 256), [cell],
                                     no_report)[cell])
            assert [w for w in widths if w > 1] == ([300] if chunk is None else [64, 64, 64, 64, 44]) * 2
    finally:
        hook.remove()
    assert [t["output"] for t in outcomes[0].samples] == [t["output"] for t in outcomes[1].samples]


def test_batched_greedy_rows_equal_their_own_greedy_decoding_even_when_rows_stop_early() -> None:
    model = tiny_model("llama")
    prompts = [torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(3)]
    alone = [engine.greedy(model, ids, 8, set()) for ids in prompts]
    stop = {alone[0][2]}  # row 0 stops at its third token at the latest; the others go on
    expected = [engine.greedy(model, ids, 8, stop, prefill_chunk=16) for ids in prompts]
    assert len(expected[0]) <= 3 and max(len(e) for e in expected) > 3
    assert engine.greedy_batch(model, prompts, 8, stop, prefill_chunk=16) == expected


@pytest.mark.parametrize("rope", ["rerope:window=32", "yarn:factor=2", "dynamic-ntk:factor=2"])
def test_batched_passkey_trials_record_what_batch_one_records(tiny, rope) -> None:
    task, cell = make("passkey", samples=4), Cell(300, 0.5)
    batches: list[int] = []
    hook = tiny.model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    try:
        one = task.run(engine_of(tiny), resolved(rope, 256), [cell], no_report)[cell]
        assert set(batches) == {1}
        batches.clear()
        three = task.run(engine_of(tiny, batch_size=3), resolved(rope, 256), [cell], no_report)[cell]
    finally:
        hook.remove()
    assert 3 in batches  # trials of one prompt length went through side by side
    assert [t["output"] for t in three.samples] == [t["output"] for t in one.samples]
    assert three.metrics == one.metrics


def test_reserved_cache_equals_concatenation_and_grows_past_its_reserve() -> None:
    model = tiny_model("llama")
    cache, plain = engine.reserved_cache(model, 10), DynamicCache(config=model.config)
    for width in (8, 1, 1, 5, 1):  # the fourth update outgrows the 10 reserved positions
        k, v = torch.randn(1, 2, width, 16), torch.randn(1, 2, width, 16)
        got, expected = cache.layers[0].update(k, v), plain.layers[0].update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert cache.get_seq_length() == 16 and cache.layers[0].capacity == 20
    cache.crop(-3)
    assert cache.get_seq_length() == 13 and cache.layers[0].filled == 13


def test_passkey_and_niah_honour_the_chat_template_and_record_it(tiny_tokenizer) -> None:
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<s>[USER] {{ m['content'] }} [/USER]{% endfor %}"
                               "{% if add_generation_prompt %} [BOT]{% endif %}")
    engine = Engine(None, tokenizer, 256)
    before, after = engine.chat_wrapper()
    for name in ("passkey", "niah"):
        chat, plain = make(name, chat_template=True), make(name)
        assert chat.spec != plain.spec and "chat_template=true" in chat.spec  # part of the cell's identity
        prompt = chat.build_prompt(engine, 300, 0.5, 0)
        assert len(prompt.ids) == 300 and prompt.ids[:len(before)] == before and prompt.ids[-len(after):] == after
        assert tokenizer.decode(prompt.ids).count("[USER]") == 1
        assert plain.build_prompt(engine, 300, 0.5, 0).ids[:len(before)] != before
