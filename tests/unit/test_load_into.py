"""load_into on one process: meta models materialised from a checkpoint, ties, keys, dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import distload
import distload.api
from distload.synthetic import LlamaShape, llama_tensors, write_checkpoint
from tests.models import TinyLlama
from tests.reference import read_all, same_bits

SHAPE = LlamaShape(vocab=120, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = {n: (s, torch.bfloat16) for n, s in llama_tensors(SHAPE).items()}
    spec["step"] = ((), torch.int64)
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), spec, max_shard_bytes=20_000)


def test_meta_model_materialised_bit_exact(ckpt: Path) -> None:
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    result = distload.load_into(model, ckpt, device="cpu")
    assert result.missing_keys == [] and result.unexpected_keys == []
    ref = read_all(ckpt)
    for name, tensor in model.state_dict().items():
        assert not tensor.is_meta
        assert same_bits(tensor, ref[name]), name
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)
    # the model runs
    model(torch.tensor([[1, 2, 3]]))


def test_no_second_copy_parameters_are_the_loaded_tensors(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each parameter's memory is the very tensor the load filled (same storage pointer), not
    a copy of it; and the report's held bytes are the model's."""
    loaded: dict[str, torch.Tensor] = {}
    real_load = distload.api.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        state = real_load(*args, **kwargs)
        loaded.update(state)
        return state

    monkeypatch.setattr(distload.api, "load", spy)
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    result = distload.load_into(model, ckpt, device="cpu")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    assert loaded and set(loaded) <= set(params)
    for name, tensor in loaded.items():
        assert params[name].data_ptr() == tensor.data_ptr(), f"{name} was copied"
        assert params[name].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert result.report.ranks[0].bytes_held == held


def test_cast_floating_only(ckpt: Path) -> None:
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    distload.load_into(model, ckpt, dtype=torch.float32, device="cpu")
    assert model.lm_head.weight.dtype == torch.float32
    assert model.step.dtype == torch.int64
    ref = read_all(ckpt)
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"].float())


def test_tied_weights_stay_tied_when_checkpoint_has_one(tmp_path: Path, ckpt: Path) -> None:
    ref = read_all(ckpt)
    ref.pop("lm_head.weight")
    save_file(ref, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = TinyLlama(SHAPE, tied=True)
    result = distload.load_into(model, tmp_path, device="cpu")
    assert result.missing_keys == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert same_bits(model.lm_head.weight.data, ref["model.embed_tokens.weight"])


def test_missing_and_unexpected_keys(tmp_path: Path, ckpt: Path) -> None:
    ref = read_all(ckpt)
    ref.pop("model.norm.weight")
    ref["extra.bias"] = torch.zeros(3)
    save_file(ref, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    with pytest.raises(distload.DistLoadError, match=r"lacks 1 tensor\(s\).*model.norm.weight"):
        distload.load_into(model, tmp_path, device="cpu")
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    result = distload.load_into(model, tmp_path, device="cpu", strict=False)
    assert result.missing_keys == ["model.norm.weight"]
    assert result.unexpected_keys == ["extra.bias"]
    assert model.model.norm.weight.is_meta  # left as it was, visibly not loaded
    assert result.report.bytes_read == sum(
        t.numel() * t.element_size() for n, t in ref.items() if n != "extra.bias"
    )


def test_shape_mismatch_is_an_error(ckpt: Path) -> None:
    other = LlamaShape(vocab=121, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)
    with torch.device("meta"):
        model = TinyLlama(other)
    with pytest.raises(distload.DistLoadError, match="has shape"):
        distload.load_into(model, ckpt, device="cpu")


def test_meta_non_persistent_buffer_is_an_error(ckpt: Path) -> None:
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
        model.register_buffer("rope", torch.ones(4), persistent=False)
    with pytest.raises(distload.DistLoadError, match="non-persistent buffer"):
        distload.load_into(model, ckpt, device="cpu")


def test_real_buffers_not_in_checkpoint_are_kept(ckpt: Path) -> None:
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    model.register_buffer("rope", torch.arange(4.0), persistent=False)
    distload.load_into(model, ckpt, device="cpu")
    assert torch.equal(model.rope, torch.arange(4.0))


def test_failed_load_into_leaves_model_visibly_unloaded(ckpt: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8])
    with torch.device("meta"):
        model = TinyLlama(SHAPE)
    with pytest.raises(distload.CheckpointError):
        distload.load_into(model, broken, device="cpu")
    # nothing was assigned: every parameter is still on the meta device
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("enabled", [True, False])
def test_load_pauses_the_garbage_collector_and_restores_it(ckpt: Path, enabled: bool) -> None:
    """The collector is paused during a load (its passes over many small objects dominated
    loads of tens of thousands of tensors) and left as it was, also when the load fails."""
    import gc

    from distload.placement import Layout

    seen: list[bool] = []

    class Spy:
        def layouts(self, tensors: object, world_size: int) -> list[Layout]:
            seen.append(gc.isenabled())
            return [Layout()] * len(tensors)  # type: ignore[arg-type]

        def describe(self) -> str:
            return "spy"

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        state = distload.load(ckpt, Spy(), device="cpu")
        assert seen == [False] and gc.isenabled() is enabled
        assert same_bits(state["step"], read_all(ckpt)["step"])
        with pytest.raises(distload.DistLoadError):
            distload.load(ckpt / "missing", device="cpu")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


class _Experts(torch.nn.Module):
    """Fused expert parameters as transformers' MoE modules hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.empty(3, 8, 4))
        self.down_proj = torch.nn.Parameter(torch.empty(3, 4, 4))


class _Moe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Module()
        self.layer.mlp = torch.nn.Module()
        self.layer.mlp.experts = _Experts()
        self.layer.mlp.gate = torch.nn.Linear(4, 3, bias=False)


def test_fused_experts_from_per_expert_checkpoint(tmp_path: Path) -> None:
    """Without transforms the error says what to pass; with fused_experts() every fused
    parameter is torch.stack / cat of the per-expert tensors, bit for bit."""
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "layer.mlp.gate.weight": ((3, 4), torch.float32)
    }
    for e in range(3):
        for proj, shape in (("gate_proj", (4, 4)), ("up_proj", (4, 4)), ("down_proj", (4, 4))):
            spec[f"layer.mlp.experts.{e}.{proj}.weight"] = (shape, torch.float32)
    ckpt = write_checkpoint(tmp_path / "moe", spec, max_shard_bytes=200)
    with torch.device("meta"):
        model = _Moe()
    with pytest.raises(distload.DistLoadError, match=r"transforms=distload\.fused_experts\(\)"):
        distload.load_into(model, ckpt, device="cpu")
    result = distload.load_into(model, ckpt, device="cpu", transforms=distload.fused_experts())
    assert result.missing_keys == [] and result.unexpected_keys == []
    ref = read_all(ckpt)
    want = torch.stack(
        [
            torch.cat([ref[f"layer.mlp.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj")])
            for e in range(3)
        ]
    )
    assert same_bits(model.layer.mlp.experts.gate_up_proj.data, want)
    down = torch.stack([ref[f"layer.mlp.experts.{e}.down_proj.weight"] for e in range(3)])
    assert same_bits(model.layer.mlp.experts.down_proj.data, down)
    assert same_bits(model.layer.mlp.gate.weight.data, ref["layer.mlp.gate.weight"])
    # the CLI's --verify check understands stacked links too
    from distload.verify import verify_against_safetensors

    state = distload.load(ckpt, transforms=distload.fused_experts(), device="cpu")
    assert verify_against_safetensors(state.plan, state, 0) == []
    state["layer.mlp.experts.down_proj"][1, 2, 3] += 1
    assert verify_against_safetensors(state.plan, state, 0) == ["layer.mlp.experts.down_proj"]


def test_a_base_model_checkpoint_in_a_model_with_a_head_gets_a_hint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)  # names without "bert."
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformers.BertForSequenceClassification(config)
    with pytest.raises(distload.DistLoadError, match=r"lack the model's prefix 'bert'") as info:
        distload.load_into(model, tmp_path, device="cpu")
    assert "distload.Rename(r'^', 'bert.')" in str(info.value)
    # and the hint's advice works: everything but the new head loads
    with init_empty_weights():
        model = transformers.BertForSequenceClassification(config)
    result = distload.load_into(
        model, tmp_path, device="cpu", strict=False, transforms=[distload.Rename(r"^", "bert.")]
    )
    assert all(k.startswith("classifier.") for k in result.missing_keys), result.missing_keys


def test_local_subfolder(tmp_path: Path, ckpt: Path) -> None:
    import shutil

    shutil.copytree(ckpt, tmp_path / "weights")
    state = distload.load(tmp_path, subfolder="weights", device="cpu")
    ref = read_all(ckpt)
    assert set(state) == set(ref) and all(same_bits(state[n], ref[n]) for n in ref)


def test_a_load_without_dtensors_never_imports_torch_distributed_tensor(ckpt: Path) -> None:
    """Importing ``torch.distributed.tensor`` costs a fresh process about 1.7 s (sympy among
    its imports); a load with no DTensor anywhere must not pay it (the bench runs a fresh
    process per load). Checked in a fresh interpreter: out=, a TP placement, load_into."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys, torch, distload
        from distload.placement import preset
        from tests.models import TinyLlama
        from distload.synthetic import LlamaShape
        SHAPE = LlamaShape(vocab=120, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)
        root = {str(ckpt)!r}
        ref = distload.load(root)
        out = {{n: torch.empty_like(t) for n, t in ref.items()}}
        distload.load(root, distload.TensorParallel(preset("llama")), out=out)
        from tests.reference import same_bits
        assert all(same_bits(out[n], ref[n]) for n in ref)
        model = TinyLlama(SHAPE)  # (built under torch.device("meta"), torch imports it itself)
        distload.load_into(model, root)
        loaded = sorted(m for m in sys.modules if m.startswith("torch.distributed.tensor"))
        assert not loaded, loaded
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
