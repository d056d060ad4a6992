"""Model loading: the offline default, local directories, and the errors users hit."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_config
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from lctx import models, patches
from lctx.patches.arch import UnsupportedModelError


@pytest.fixture(scope="module")
def smollm2() -> models.Loaded:
    return models.load()


def test_default_model_is_the_offline_smollm2(smollm2) -> None:
    assert smollm2.name == "smollm2-135m"
    assert smollm2.train_len == 8192
    assert smollm2.model.config.model_type == "llama"
    assert smollm2.model.config._attn_implementation == "sdpa"
    assert smollm2.dtype == torch.float32  # --dtype auto on CPU
    # the dequantized copy is cached, so later loads skip the ~20 s GGUF conversion
    assert (models.gguf_cache(models.Path(models.resolve_alias("smollm2-135m"))) / "config.json").is_file()
    # a real language model: English prose is predictable
    from pydoc_data.topics import topics

    text = topics["while"] + topics["for"]
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 30


def test_local_directory_and_train_len_override(tmp_path) -> None:
    AutoModelForCausalLM.from_config(tiny_config("qwen2")).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    loaded = models.load(str(tmp_path))
    assert loaded.train_len == 64 and loaded.name == str(tmp_path)
    assert models.load(str(tmp_path), train_len=32).train_len == 32


def _save_tokenizer(path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_model_without_rotary_embedding(tmp_path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2' has no rotary position embedding .*learned absolute"):
        models.load(str(tmp_path))


def test_not_a_causal_lm(tmp_path) -> None:
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError, match=r"\(bert\) is not a causal language model"):
        models.load(str(tmp_path))


def test_missing_model_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="model 'no-such-org/no-such-model' not found.*HF_HUB_OFFLINE"):
        models.load("no-such-org/no-such-model")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.load(str(tmp_path / "missing" / "model"))
    with pytest.raises(models.ModelLoadError, match="without config.json"):
        models.load(str(tmp_path))
    with pytest.raises(models.ModelLoadError, match="GGUF file .* not found"):
        models.load(str(tmp_path / "x.gguf"))


def test_bad_dtype_and_device() -> None:
    with pytest.raises(models.ModelLoadError, match="unknown dtype 'float8'; choose one of auto, float32"):
        models.resolve_dtype("float8", torch.device("cpu"))
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(models.ModelLoadError, match="unknown device 'tpu7'"):
        models.resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelLoadError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_attention_variant_rejects_unknown_architecture(monkeypatch) -> None:
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    monkeypatch.setattr(model.config, "model_type", "exotic")
    name = next((n for n, v in patches.REGISTRY.items() if v.kind == "attention"), None)
    if name is None:
        pytest.fail("no attention-level variant registered")
    with pytest.raises(UnsupportedModelError, match="supports the architectures llama, mistral.*'exotic'"):
        with patches.apply(model, name):
            pass


def test_two_processes_converting_one_gguf_file_both_get_the_cache(tmp_path, monkeypatch) -> None:
    """Ranks or workers on one machine may convert the same GGUF file at once: the one that finishes second
    uses the first one's copy instead of failing on the rename."""
    import transformers

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("LCTX_CACHE", str(tmp_path / "cache"))
    target = models.gguf_cache(gguf)

    class Saved:
        config = None

        def save_pretrained(self, path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
            if not target.exists():  # the other process finishes its conversion meanwhile
                target.mkdir(parents=True)
                (target / "config.json").write_text('{"first": true}')

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saved())
    monkeypatch.setattr(models, "AutoTokenizer", transformers.AutoTokenizer)
    assert models._convert_gguf(gguf) == target
    assert (target / "config.json").read_text() == '{"first": true}'
    left = sorted(p.name for p in target.parent.iterdir())
    assert left == [target.name, target.name + ".lock"]  # the second copy removed (the lock file stays)
