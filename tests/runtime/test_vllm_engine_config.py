"""The model folder vLLM loads with dummy weights: config.json from a ModelSpec (no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nitsum_opt.models.spec import MODEL_PRESETS
from nitsum_runtime.vllm_engine import VLLM_ENVIRONMENT, EngineSettings, llama_config, write_model_dir


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_config_json_has_the_published_sizes(name: str, tmp_path: Path) -> None:
    spec = MODEL_PRESETS[name]
    cfg = json.loads((write_model_dir(spec, tmp_path / "m") / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (
        spec.hidden_size,
        spec.num_layers,
        spec.intermediate_size,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        spec.num_attention_heads,
        spec.num_kv_heads,
        spec.head_dim,
    )
    assert cfg["vocab_size"] == spec.vocab_size
    assert cfg["max_position_embeddings"] == spec.max_model_len
    assert cfg["torch_dtype"] == "bfloat16"


def test_qwen_sizes_are_qwen25_14b() -> None:
    cfg = llama_config(MODEL_PRESETS["qwen2.5-14b"])
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (5120, 48, 13824)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (40, 8, 152064)
    assert cfg["head_dim"] == 128


def test_non_bf16_spec_is_refused() -> None:
    spec = MODEL_PRESETS["llama-3.1-8b"].model_copy(update={"dtype_bytes": 4})
    with pytest.raises(ValueError, match="dtype_bytes=4"):
        llama_config(spec)


def test_engine_args_turn_off_prefix_caching_and_async_scheduling(tmp_path: Path) -> None:
    spec = MODEL_PRESETS["llama-3.1-8b"]
    args = EngineSettings(tp=2).engine_args(tmp_path, spec)
    assert args["load_format"] == "dummy"
    assert args["skip_tokenizer_init"] is True
    assert args["enable_prefix_caching"] is False
    assert args["enable_sleep_mode"] is True
    assert args["enforce_eager"] is False
    assert args["async_scheduling"] is False
    assert args["tensor_parallel_size"] == 2
    assert args["max_model_len"] == spec.max_model_len


def test_environment_keeps_nvlink_multicast_off_and_engine_core_in_process() -> None:
    assert VLLM_ENVIRONMENT["NCCL_NVLS_ENABLE"] == "0"
    assert VLLM_ENVIRONMENT["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert VLLM_ENVIRONMENT["NVSHMEM_DISABLE_NVLS"] == "1"
    assert VLLM_ENVIRONMENT["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
