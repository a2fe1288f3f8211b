"""The pinned megatron-core / nvidia-modelopt pair (README "Versions") is what is installed, and the
parts of each that this project relies on are present and work together."""
import importlib.metadata as md
import pathlib
import re

import pytest

REQ = pathlib.Path(__file__).resolve().parents[1] / "requirements.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQ.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s#]+)", line.strip())
        if m:
            pins[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("pkg", ["torch", "megatron-core", "nvidia-modelopt", "compressed-tensors", "transformers",
                                 "gguf", "llama-cpp-python"])
def test_installed_version_matches_pin(pkg):
    pins = _pins()
    assert pkg in pins, f"{pkg} must be pinned in requirements.txt"
    installed = md.version(pkg)
    # torch's local build tag (+cpu / +cu130) is not part of the pin
    assert installed.split("+")[0] == pins[pkg], f"{pkg}: installed {installed}, pinned {pins[pkg]}"


def test_modelopt_pieces_we_use_exist_with_this_megatron_core():
    """ModelOpt 0.47 with megatron-core 0.16.1: the quantization plugin for Megatron modules loads,
    and the functional-backend hook (ModelOpt >= 0.41) that carries our numerics is there."""
    import megatron.core  # noqa: F401
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq
    from modelopt.torch.quantization.plugins import megatron as mo_megatron  # noqa: F401

    assert callable(tq.register_quant_backend)
    assert callable(mtq.quantize)


def test_modelopt_megatron_export_is_not_usable_with_this_megatron_core():
    """Why tools/export.py exists: ModelOpt's Megatron -> HF exporter expects a newer megatron-core
    (it references HybridModel). If this starts passing after an upgrade, re-evaluate the pins."""
    from modelopt.torch.export import unified_export_megatron as uem

    with pytest.raises(NameError, match="HybridModel"):
        uem.GPTModelExporter(model=None, pretrained_model_name_or_path=None)


def test_gpu_requirements_stay_inside_megatron_cores_transformer_engine_range():
    """requirements-gpu.txt may not admit a Transformer-Engine that megatron-core 0.16.1 itself
    excludes (it declares >=2.9.0a0,<2.12.0): every candidate our range allows, theirs allows."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    ours = [Requirement(ln) for ln in (REQ.parent / "requirements-gpu.txt").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    (te,) = [r for r in ours if r.name == "transformer-engine"]
    (theirs,) = [Requirement(r) for r in md.requires("megatron-core") or []
                 if Requirement(r).name == "transformer-engine"]
    candidates = [Version(f"{a}.{b}.{c}") for a in (1, 2, 3) for b in range(0, 16) for c in (0, 1)]
    allowed = [v for v in candidates if te.specifier.contains(v)]
    assert allowed, te
    assert all(theirs.specifier.contains(v, prereleases=True) for v in allowed), \
        (str(te.specifier), str(theirs.specifier), [str(v) for v in allowed
                                                    if not theirs.specifier.contains(v, prereleases=True)])
