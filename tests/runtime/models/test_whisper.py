"""The own Whisper against transformers' Whisper of the same weights: encoder output, decoder logits, greedy
transcription; and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft import formats
from sparseft.errors import SparseftError
from sparseft.models import find_targets
from sparseft.runtime import convert
from sparseft.runtime.models import WhisperModel


def _archive(model: Any, path: Path) -> Path:
    path.mkdir()
    formats.write_bitmask(model, find_targets(model), path)
    model.generation_config.save_pretrained(path)  # both sides start from the same decoder prompt
    return path


def _features(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, 100, generator=torch.Generator().manual_seed(1))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers(dtype: torch.dtype, tmp_path: Path, whisper_model: Any) -> None:
    reference = whisper_model(sparsity=0.7).to(dtype)
    own = convert.load(_archive(reference, tmp_path / "a"), dtype=dtype, decoder="sparseft")
    assert isinstance(own, WhisperModel) and own.decoder_name == "sparseft whisper"
    if dtype == torch.float32:  # the bf16 kernels round their inputs to bf16: so does the reference then
        with torch.no_grad():
            for module in find_targets(reference).values():
                module.weight.copy_(module.weight.bfloat16().float())
                module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    features = _features().to(dtype)
    tokens = torch.tensor([[0, 5, 17, 42, 8, 9], [0, 3, 3, 70, 2, 11]])
    with torch.inference_mode():
        expected = reference(input_features=features, decoder_input_ids=tokens)
        encoded = own.encode(features)
        cache = own.new_cache(2, 16, encoded)
        prefill = own(tokens[:, :3], cache).logits
        steps = [own(tokens[:, i : i + 1], cache).logits for i in range(3, 6)]
    tolerance = 1e-4 if dtype == torch.float32 else 0.03
    assert _relative(encoded, expected.encoder_last_hidden_state) < tolerance
    got = torch.cat([prefill, *steps], 1)
    for i in range(tokens.shape[1]):
        assert _relative(got[:, i], expected.logits[:, i]) < tolerance, i


def test_greedy_transcription_equals_transformers(tmp_path: Path, whisper_model: Any) -> None:
    reference = whisper_model(sparsity=0.7).float()
    reference.generation_config.suppress_tokens = [7, 9]
    reference.generation_config.begin_suppress_tokens = [1]
    own = convert.load(_archive(reference, tmp_path / "a"), dtype=torch.float32, decoder="sparseft")
    with torch.no_grad():
        for module in find_targets(reference).values():
            module.weight.copy_(module.weight.bfloat16().float())
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    features = _features()
    with torch.inference_mode():
        expected = reference.generate(features, max_new_tokens=12, do_sample=False)
    got = own.generate(features, max_new_tokens=12)
    new = got[:, len(own.prompt()) :]
    assert new.tolist() == expected[:, -new.shape[1] :].tolist()
    assert not torch.isin(new, torch.tensor([7, 9])).any()


def test_whisper_is_opt_in_and_refuses_what_it_does_not_do(tmp_path: Path, whisper_model: Any) -> None:
    path = _archive(whisper_model(sparsity=0.7), tmp_path / "a")
    auto = convert.load(path)
    assert not isinstance(auto, WhisperModel)
    assert "opt-in" in auto.decoder_name
    own = convert.load(path, decoder="sparseft")
    with pytest.raises(SparseftError, match="beam search"):
        own.generate(_features(), num_beams=3)
    with pytest.raises(SparseftError, match="input_features must be"):
        own.generate(torch.zeros(1, 16, 80))
    with pytest.raises(SparseftError, match="max_target_positions"):
        own.generate(_features(1), max_new_tokens=200)
