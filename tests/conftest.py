"""Shared fixtures: a tiny random Llama with a tokenizer trained offline, and the real SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

TINY_TRAIN_LEN = 256


@pytest.fixture
def one_thread():
    """Tiny models: extra torch threads only synchronise, so matrices run single-threaded (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_tokenizer():
    """A byte-level BPE (vocab 512) trained in memory on the Python reference manual; adds a BOS."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [text for _, text in sorted(topics.items())][:30]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=TINY_TRAIN_LEN)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A directory holding a 2-layer random Llama (train length 256) and its tokenizer: ``lctx.models.load`` works."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_TRAIN_LEN,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so that NLLs vary by position
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny model loaded through ``lctx.models.load`` (fp32, CPU)."""
    from lctx import models

    return models.load(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (trained to 8192 tokens); skipped when its package is not installed."""
    from lctx import models

    try:
        return models.load(models.DEFAULT_MODEL, dtype="float32", device="cpu")
    except models.ModelLoadError as err:
        pytest.skip(f"default model unavailable: {err}")
