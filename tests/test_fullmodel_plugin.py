"""The vLLM plugin ``dqprof_nf4`` on CPU: registration, module selection, load-time NF4, the
custom op under torch.compile. vLLM is not installed here: a stand-in package provides the
few classes the plugin subclasses (with vLLM 0.20.2's names and call signatures); the GPU
test (tests/test_fullmodel_gpu.py) runs the real thing. The kernel call itself is replaced by
an fp32 product with the kernel's own dequantized weight (``TritonNf4.reference``): the
Triton kernel is tested in tests/test_triton_nf4.py."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dqprof.errors import DqprofError
from dqprof.fullmodel import nf4_op, plugin
from dqprof.kernels.triton_nf4 import TritonNf4

FAKE = {
    "vllm/__init__.py": "",
    "vllm/model_executor/__init__.py": "",
    "vllm/model_executor/layers/__init__.py": "",
    "vllm/model_executor/utils.py": """
        def set_weight_attrs(weight, attrs):
            for k, v in (attrs or {}).items():
                setattr(weight, k, v)
    """,
    "vllm/model_executor/parameter.py": """
        import torch

        class ModelWeightParameter(torch.nn.Parameter):
            def __new__(cls, data, input_dim, output_dim, weight_loader):
                p = super().__new__(cls, data, requires_grad=False)
                p.input_dim, p.output_dim, p.weight_loader = input_dim, output_dim, weight_loader
                return p
    """,
    "vllm/model_executor/layers/linear.py": """
        import torch

        class LinearMethodBase:
            pass

        class UnquantizedLinearMethod(LinearMethodBase):
            def create_weights(self, layer, ipp, sizes, i, o, dtype, **extra):
                layer.register_parameter("weight", torch.nn.Parameter(
                    torch.empty(sum(sizes), ipp, dtype=dtype), requires_grad=False))

            def process_weights_after_loading(self, layer):
                pass

            def apply(self, layer, x, bias=None):
                return torch.nn.functional.linear(x, layer.weight, bias)

        class LinearBase(torch.nn.Module):
            # as vLLM 0.20.2: sizes set, then quant_config.get_quant_method(self, prefix)
            def __init__(self, input_size, output_sizes, quant_config, prefix):
                super().__init__()
                self.input_size, self.output_size = input_size, sum(output_sizes)
                self.quant_method = quant_config.get_quant_method(self, prefix=prefix)
                self.quant_method.create_weights(self, input_size, list(output_sizes),
                                                 input_size, self.output_size, torch.bfloat16,
                                                 weight_loader=self.weight_loader)

            def weight_loader(self, param, loaded, shard_id=None):
                param.data.copy_(loaded)

            def forward(self, x):
                return self.quant_method.apply(self, x)

        class VocabParallelEmbedding(torch.nn.Module):
            pass
    """,
    "vllm/model_executor/layers/quantization/__init__.py": """
        QUANTIZATION_METHODS = ["bitsandbytes", "fp8"]
        _CUSTOM = {}

        class QuantizationConfig:
            def __init__(self):
                self.packed_modules_mapping = {}

        def register_quantization_config(name):
            def wrap(cls):
                if name not in QUANTIZATION_METHODS:
                    QUANTIZATION_METHODS.append(name)
                if not issubclass(cls, QuantizationConfig):
                    raise ValueError("not a QuantizationConfig")
                _CUSTOM[name] = cls
                return cls
            return wrap

        def get_quantization_config(name):
            return _CUSTOM[name]
    """,
}


def _forget_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for rel, text in FAKE.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget_vllm(monkeypatch)
    plugin._classes.cache_clear()
    nf4_op.unbind_all()

    def reference_call(self, state, x):  # the kernel's own dequantized weight, in fp32
        return (x.float() @ self.reference(state).T).to(torch.bfloat16)

    monkeypatch.setattr(TritonNf4, "__call__", reference_call)
    plugin.register()
    yield importlib.import_module("vllm.model_executor.layers.quantization")
    plugin._classes.cache_clear()
    nf4_op.unbind_all()
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # the stand-in must not outlive the test


def _layer(q, cfg, prefix: str, k: int, sizes: tuple[int, ...], seed: int = 0):
    from vllm.model_executor.layers.linear import LinearBase

    layer = LinearBase(k, sizes, cfg, prefix)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(sum(sizes), k, generator=g) * 0.02).to(torch.bfloat16)
    layer.weight_loader(layer.weight, w)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, w


def test_registers_with_vllm(fake_vllm) -> None:
    q = fake_vllm
    assert "dqprof_nf4" in q.QUANTIZATION_METHODS
    cls = q.get_quantization_config("dqprof_nf4")
    assert cls.get_name() == "dqprof_nf4" and cls.get_min_capability() == 80
    assert cls.get_config_filenames() == []  # nothing on disk: quantized at load
    assert cls.from_config({"modules_to_not_convert": ["lm_head"]}).skip == ["lm_head"]
    plugin.register()  # idempotent: the entry point and the worker may both call it
    assert q.QUANTIZATION_METHODS.count("dqprof_nf4") == 1


def test_entry_point_is_declared() -> None:
    import tomllib

    py = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    eps = py["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"dqprof_nf4": "dqprof.fullmodel.plugin:register"}


def test_module_selection_matches_bitsandbytes(fake_vllm) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod, VocabParallelEmbedding

    cfg = fake_vllm.get_quantization_config("dqprof_nf4")(["per_layer_model_projection"])
    pre = "model.layers.0"
    qkv, _ = _layer(fake_vllm, cfg, f"{pre}.self_attn.qkv_proj", 128, (128, 64, 64))
    down, _ = _layer(fake_vllm, cfg, f"{pre}.mlp.down_proj", 256, (128,), seed=1)
    odd, _ = _layer(fake_vllm, cfg, f"{pre}.mlp.odd_proj", 96, (64,), seed=2)  # K % 64 != 0
    skip, _ = _layer(fake_vllm, cfg, "model.per_layer_model_projection", 128, (64,), seed=3)
    assert cfg.get_quant_method(VocabParallelEmbedding(), "model.embed_tokens") is None
    assert isinstance(odd.quant_method, UnquantizedLinearMethod) and hasattr(odd, "weight")
    assert isinstance(skip.quant_method, UnquantizedLinearMethod)
    assert sorted(plugin.REPORT["quantized"]) == [f"{pre}.mlp.down_proj",
                                                  f"{pre}.self_attn.qkv_proj"]
    assert plugin.REPORT["quantized"][f"{pre}.self_attn.qkv_proj"] == {
        "n": 256, "k": 128, "shards": [128, 64, 64]}
    assert "K % 64" in plugin.REPORT["bf16"][f"{pre}.mlp.odd_proj"]
    assert "modules_to_not_convert" in plugin.REPORT["bf16"]["model.per_layer_model_projection"]
    assert not hasattr(qkv, "weight") and not hasattr(down, "weight")  # only NF4 stays
    assert sorted(nf4_op.bound_keys()) == sorted(plugin.REPORT["quantized"])


def test_skip_rule_is_bitsandbytes_rule() -> None:
    # vLLM's is_layer_skipped_bnb: a dotted component, or a leading dotted prefix
    p = "model.layers.3.self_attn.qkv_proj"
    assert plugin.skipped_by_config(p, ["self_attn"])
    assert plugin.skipped_by_config(p, ["model.layers.3"])
    assert not plugin.skipped_by_config(p, ["model.layers.30"])
    assert not plugin.skipped_by_config(p, ["qkv"])  # no substring match
    assert not plugin.skipped_by_config(p, [])
    assert plugin.summarize([f"model.layers.{i}.mlp.down_proj" for i in range(3)]
                            + ["model.x"]) == {"model.layers.*.mlp.down_proj": 3, "model.x": 1}


def test_quantized_layer_computes_the_nf4_product(fake_vllm) -> None:
    cfg = fake_vllm.get_quantization_config("dqprof_nf4")()
    layer, w = _layer(fake_vllm, cfg, "model.layers.0.mlp.gate_up_proj", 256, (128, 128))
    x = (torch.randn(5, 256, generator=torch.Generator().manual_seed(7))).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (5, 256) and y.dtype == torch.bfloat16
    exact = x.float() @ w.float().T
    cos = torch.nn.functional.cosine_similarity(y.float().flatten(), exact.flatten(), dim=0)
    assert cos > 0.99  # NF4 of a normal weight: ~0.995
    y3 = layer(x.view(1, 5, 256))  # leading dims are kept
    assert torch.equal(y3.view(5, 256), y)
    # the fp32 absmax vLLM's bitsandbytes path reads (its nested statistics undone at load)
    st = layer.dqprof_nf4_state
    assert not st.nested and st.absmax.dtype == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes")
def test_fused_weight_is_bitsandbytes_nf4_of_each_shard(fake_vllm) -> None:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    cfg = fake_vllm.get_quantization_config("dqprof_nf4")()
    sizes = (128, 64, 64)
    layer, w = _layer(fake_vllm, cfg, "model.layers.0.self_attn.qkv_proj", 256, sizes)
    ours = TritonNf4().reference(layer.dqprof_nf4_state)
    # what vLLM's bitsandbytes loader does: quantize_4bit per shard, nested statistics
    theirs = []
    for part in torch.split(w, list(sizes)):
        qw, st = quantize_4bit(part.contiguous(), compress_statistics=True, quant_type="nf4")
        theirs.append(dequantize_4bit(qw, st).float())
    diff = (ours - torch.cat(theirs)).abs().max()
    # same codes; the statistics differ only by bitsandbytes' 8-bit nesting of the absmax
    assert diff <= 0.01 * w.float().abs().max()


def test_custom_op_is_opaque_to_torch_compile(fake_vllm) -> None:
    cfg = fake_vllm.get_quantization_config("dqprof_nf4")()
    layer, _ = _layer(fake_vllm, cfg, "model.layers.0.mlp.down_proj", 128, (64,))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(layer(x)) * 2

    x = torch.randn(3, 128).to(torch.bfloat16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), f(x))
    x7 = torch.randn(7, 128).to(torch.bfloat16)  # another M: the fake gives the shape
    assert torch.equal(compiled(x7), f(x7))


def test_op_names_an_unbound_layer() -> None:
    with pytest.raises(RuntimeError, match="no weight bound for layer 'nope'"):
        torch.ops.dqprof.nf4_linear(torch.zeros(1, 64), "nope", 8)


def test_missing_vllm_or_triton_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin._classes.cache_clear()
    _forget_vllm(monkeypatch)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(DqprofError, match=r'pip install -e "\.\[vllm\]"'):
        plugin.register()
    plugin._classes.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(DqprofError, match=r'pip install -e "\.\[gpu\]"') as e:
        plugin.check_triton()
    assert e.value.exit_code == 3
