"""Hostile / careless input to tools/export.py and tools/verify_export.py (issue 11, items 2, 3, 6, 7).

Every refusal: exit 2 (1 for a failed verification), one ``<prog>: error:`` line naming the file /
tensor / field, nothing written, the source byte-identical afterwards.
"""
import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from int4_qat import checksums
from int4_qat.testing import make_tiny_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


export_tool, verify_tool = _tool("export"), _tool("verify_export")
ARGS = ["--format", "int4", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tiny_hf_checkpoint("qwen3_moe", tmp_path_factory.mktemp("hostile-export") / "src", shards=2)


@pytest.fixture(scope="module")
def good_export(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "int4"
    assert export_tool.main(["--input", str(src), "--output", str(out), *ARGS]) == 0
    return out


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): checksums.hash_file(p)[1] for p in sorted(d.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_error(capsys, prog: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def _rewrite(d: Path, name: str, fn) -> None:
    """Apply ``fn`` to the tensor dict of the shard holding ``name``; keep the index in step."""
    ip = d / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    shard = d / idx["weight_map"][name]
    with safe_open(shard, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    before = set(t)
    fn(t)
    save_file(t, shard, metadata={"format": "pt"})
    for k in before - set(t):
        del idx["weight_map"][k]
    for k in set(t) - before:
        idx["weight_map"][k] = shard.name
    ip.write_text(json.dumps(idx))


# ------------------------------------------------------------------ item 2: never touch the source
@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_overwrite_never_deletes_or_changes_the_source(src, tmp_path, capsys, where):
    d = _copy(src, tmp_path / "model")
    before = _digest(d)
    out = {"same": d, "parent": tmp_path, "inside": d / "export"}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(d)
    rc = export_tool.main(["--input", str(d), "--output", str(out), "--overwrite", *ARGS])
    line = _one_error(capsys, "export")
    assert rc == 2 and "would overwrite or delete the source" in line and str(d) in line
    assert _digest(d) == before and not (d / "export").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_overwrite_replaces_only_a_previous_export(src, good_export, tmp_path, capsys):
    other = tmp_path / "mydata"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    assert export_tool.main(["--input", str(src), "--output", str(other), "--overwrite", *ARGS]) == 2
    assert "replaces only a previous export" in _one_error(capsys, "export")
    assert (other / "notes.txt").read_text() == "precious"
    prev = _copy(good_export, tmp_path / "prev")
    assert export_tool.main(["--input", str(src), "--output", str(prev), "--overwrite", *ARGS]) == 0
    assert (prev / "model.safetensors.index.json").is_file()


# ------------------------------------------------------------------ item 3: structure vs config
E = "model.layers.1.mlp.experts.3.down_proj.weight"
BROKEN = {
    "missing expert": (lambda t: t.pop(E), f"tensor {E} [128, 128] is missing"),
    "extra expert": (lambda t: t.__setitem__(E.replace("experts.3", "experts.8"), t[E].clone()),
                     f"tensor {E.replace('experts.3', 'experts.8')} [128, 128] is not part of this architecture"),
    "wrong shape": (lambda t: t.__setitem__(E, t[E][:, :64].contiguous()),
                    f"tensor {E} has shape [128, 64], the config.json implies [128, 128]"),
    "int8 in scope": (lambda t: t.__setitem__(E, t[E].to(torch.int8)), f"tensor {E} has dtype int8"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_structurally_broken_input_is_refused_and_fails_verification(src, good_export, tmp_path, capsys, kind):
    fn, expect = BROKEN[kind]
    d = _copy(src, tmp_path / "model")
    _rewrite(d, E, fn)
    out = tmp_path / "out"
    assert export_tool.main(["--input", str(d), "--output", str(out), *ARGS]) == 2
    line = _one_error(capsys, "export")
    assert expect in line and "fix: use the checkpoint's own config.json" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # verify_export (tensors only) checks the same: the broken reference fails, naming the tensor
    assert verify_tool.main(["--reference", str(d), "--export", str(good_export), "--no-logits"]) == 1
    cap = capsys.readouterr()
    assert "structure (config.json)" in cap.out and expect.split(" [")[0] in cap.out and "FAIL" in cap.out


def test_config_contradicting_the_tensors_is_refused(src, good_export, tmp_path, capsys):
    d = _copy(src, tmp_path / "model")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    assert export_tool.main(["--input", str(d), "--output", str(tmp_path / "out"), *ARGS]) == 2
    assert "has shape [128, 128], the config.json implies [256, 128]" in _one_error(capsys, "export")
    # an export whose config.json was edited: verify names the field
    e = _copy(good_export, tmp_path / "exp")
    ecfg = json.loads((e / "config.json").read_text())
    ecfg["hidden_size"] = 256
    (e / "config.json").write_text(json.dumps(ecfg))
    assert verify_tool.main(["--reference", str(src), "--export", str(e), "--no-logits"]) == 1
    assert "export config.json.hidden_size: export has 256, expected 128" in capsys.readouterr().out


# ------------------------------------------------------------------ item 6: malformed metadata
def _json_edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


MALFORMED = {
    "config is a list": ("config.json", lambda c: [1, 2], "config.json: top level must be a JSON object"),
    "weight_map is a list": (
        "model.safetensors.index.json",
        lambda i: {**i, "weight_map": list(i["weight_map"])},
        "'weight_map' must be a JSON object",
    ),
    "index outside the input": (
        "model.safetensors.index.json",
        lambda i: {**i, "weight_map": {**i["weight_map"], "lm_head.weight": "../../../etc/passwd"}},
        "maps to '../../../etc/passwd', outside the input directory",
    ),
    "config not UTF-8": ("config.json", None, "config.json is not UTF-8 text"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_metadata_is_one_line(src, tmp_path, capsys, kind, monkeypatch):
    fname, fn, expect = MALFORMED[kind]
    d = _copy(src, tmp_path / "model")
    if fn is None:
        (d / fname).write_bytes(b'{"model_type": "qwen3_moe\xff"}')
    else:
        _json_edit(d / fname, fn)
    opened = []
    real_open = safe_open
    monkeypatch.setattr(
        "int4_qat.export.source.safe_open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k)
    )
    assert export_tool.main(["--input", str(d), "--output", str(tmp_path / "out"), *ARGS]) == 2
    assert expect in _one_error(capsys, "export")
    assert not any("passwd" in str(p) for p in opened)  # refused by path, never opened


def test_quantization_config_null_means_unquantized(src, tmp_path, capsys):
    d = _copy(src, tmp_path / "model")
    _json_edit(d / "config.json", lambda c: {**c, "quantization_config": None})
    assert export_tool.main(["--input", str(d), "--output", str(tmp_path / "out"), *ARGS]) == 0


def test_safetensors_header_without_data_offsets(src, tmp_path, capsys):
    d = _copy(src, tmp_path / "model")
    shard = d / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["data_offsets"]
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    assert export_tool.main(["--input", str(d), "--output", str(tmp_path / "out"), *ARGS]) == 2
    assert f"tensor {name} has no valid 'data_offsets'" in _one_error(capsys, "export")


# ------------------------------------------------------------------ item 6: edited exports
@pytest.mark.parametrize(
    "edit, expect",
    [
        ("group_size", "quantization_config.config_groups.group_0.weights.group_size: export has 64, expected 32"),
        (
            "weight_shape",
            "model.layers.0.mlp.experts.0.up_proj.weight_shape holds [128, 64], the reference weight is [128, 128]",
        ),
    ],
)
def test_edited_export_fails_verification_without_a_crash(src, good_export, tmp_path, capsys, edit, expect):
    e = _copy(good_export, tmp_path / "exp")
    if edit == "group_size":
        _json_edit(
            e / "config.json",
            lambda c: (
                c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("group_size", 64),
                c,
            )[1],
        )
    else:
        n = "model.layers.0.mlp.experts.0.up_proj.weight_shape"
        _rewrite(e, n, lambda t: t.__setitem__(n, torch.tensor([128, 64])))
    assert verify_tool.main(["--reference", str(src), "--export", str(e), "--no-logits"]) == 1
    cap = capsys.readouterr()
    assert expect in cap.out and "FAIL" in cap.out and cap.err == ""


# ------------------------------------------------------------------ item 7: numeric flags
@pytest.mark.parametrize(
    "flag, value", [("--workers", "0"), ("--workers", "-1"), ("--serving-tp", "0"), ("--group-size", "-32")]
)
def test_nonpositive_numbers_are_refused(src, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as ei:
        export_tool.main(["--input", str(src), "--output", str(tmp_path / "out"), *ARGS, flag, value])
    assert ei.value.code == 2 and f"argument {flag}: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 6: filesystem errors
def _fs_case(kind: str, parent: Path) -> tuple[list[str], str] | None:
    """(command prefix that makes ``parent`` unwritable in the way ``kind`` says, expected errno name),
    or None when this machine cannot set it up."""
    if kind == "EFBIG":
        return ["bash", "-c", 'ulimit -f 64 && exec "$@"', "_"], "EFBIG"  # 64 KiB file-size limit
    if kind in ("EROFS", "ENOSPC"):
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return None
        mnt = (
            'mount --bind "$D" "$D" && mount -o remount,bind,ro "$D"'
            if kind == "EROFS"
            else 'mount -t tmpfs -o size=64k tmpfs "$D"'
        )
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"D={parent}; {mnt}"], capture_output=True)
        if probe.returncode:
            return None
        return ["unshare", "-m", "sh", "-c", f'D={parent}; {mnt} && exec "$@"', "_"], kind
    if kind == "EACCES/EPERM":
        if os.geteuid() != 0:
            parent.chmod(0o555)  # no write permission: EACCES
            return [], "EACCES"
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode:
            return None  # root ignores modes: immutable dir
        return [], "EPERM"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["EFBIG", "ENOSPC", "EROFS", "EACCES/EPERM"])
def test_unwritable_output_is_one_line_and_leaves_nothing(src, tmp_path, kind):
    parent = tmp_path / "outdir"
    parent.mkdir()
    case = _fs_case(kind, parent)
    if case is None:
        pytest.skip(f"cannot make a {kind} filesystem here (needs root and mount namespaces)")
    prefix, errno_name = case
    try:
        p = subprocess.run(
            prefix
            + [
                sys.executable,
                str(REPO / "tools" / "export.py"),
                "--input",
                str(src),
                "--output",
                str(parent / "int4"),
                *ARGS,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
    finally:
        if kind == "EACCES/EPERM":
            subprocess.run(["chattr", "-i", str(parent)], capture_output=True)
            parent.chmod(0o755)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0].startswith("export: error: ") and f"({errno_name})" in err[0] and str(parent) in err[0]
    assert "fix:" in err[0] and "Traceback" not in p.stderr
    assert os.listdir(parent) == []  # nothing partial left


# ------------------------------------------------------------------ the same check on training import
@pytest.mark.parametrize("kind", ["extra expert", "int8 in scope"])
def test_training_import_refuses_what_the_config_does_not_imply(src, tmp_path, kind):
    """model.checkpoint / --init-from HF import: an expert beyond num_experts was ignored and an
    int8 tensor silently cast; both are refused now, naming the tensor."""
    from int4_qat.arch import build_model, import_hf_checkpoint, load_arch
    from int4_qat.compat import cpu as C

    C.init_single_process_gloo()
    fn, expect = BROKEN[kind]
    d = _copy(src, tmp_path / "model")
    _rewrite(d, E, fn)
    arch = load_arch(d)
    with pytest.raises(ValueError, match=re.escape(expect)):
        import_hf_checkpoint(build_model(arch, use_te=False), arch, d)
