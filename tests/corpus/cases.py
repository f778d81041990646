"""A corpus of bad inputs, built at test time (no binary blobs in the repository).

Every case is a command line run as a new user would, with the exit code it must end in
and a fragment its message must contain. `build_inputs(root)` writes every file the cases
read; `{root}` in a case's arguments is replaced by that directory. Run this module as a
script for the summary the issue asks for (clean exit / traceback / wrong exit / input
modified / partial output)::

    python tests/corpus/cases.py    # with gmcurv installed: pip install -e .
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Case:
    """One bad-input run: arguments, expected exit code, a fragment of the message."""

    id: str
    args: tuple[str, ...]
    exit: int = 2
    fragment: str = ""
    outputs: tuple[str, ...] = ()  # files that must not exist afterwards (no partial output)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # a directory under root to run in (config-file cases)
    root_only: bool | None = None  # None: always; False: skipped when running as root
    pending: str = ""  # fixed by another piece of work not yet landed (an expected failure)


# --------------------------------------------------------------------------- the inputs
def _mlp_state(sizes=(6, 8, 3), seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        state[f"net.{2 * i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"net.{2 * i}.bias"] = torch.randn(b, generator=g) * 0.1
    return state


def _meta(**extra: str) -> dict[str, str]:
    return {"gmcurv.arch": "mlp:tanh", "gmcurv.loss": "cross_entropy", **extra}


def _raw_safetensors(path: Path, header: object, payload: bytes = b"") -> None:
    """A file with a hand-written header (for headers safetensors would refuse to write)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _good_header(**meta: object) -> dict:
    h: dict = {
        "net.0.weight": {"dtype": "F32", "shape": [8, 6], "data_offsets": [0, 192]},
        "net.0.bias": {"dtype": "F32", "shape": [8], "data_offsets": [192, 224]},
        "net.2.weight": {"dtype": "F32", "shape": [3, 8], "data_offsets": [224, 320]},
        "net.2.bias": {"dtype": "F32", "shape": [3], "data_offsets": [320, 332]},
    }
    if meta:
        h["__metadata__"] = meta
    return h


def build_inputs(root: Path) -> None:
    """Write every file the cases read into `root` (about 1 MB, well under a second)."""
    root.mkdir(parents=True, exist_ok=True)
    state = _mlp_state()
    save_file(state, str(root / "M.safetensors"), metadata=_meta())
    save_file(state, str(root / "nometa.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    (root / "D").mkdir(exist_ok=True)
    save_file(
        {"inputs": x[:20].contiguous(), "targets": y[:20].contiguous()},
        str(root / "D/a.safetensors"),
    )
    save_file(
        {"inputs": x[20:].contiguous(), "targets": y[20:].contiguous()},
        str(root / "D/b.safetensors"),
    )
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(root / "d.safetensors"))
    payload = b"".join(
        state[k].numpy().tobytes()
        for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    )
    (root / "user.py").write_text("def model():\n    return 3\n")
    (root / "evil.py").write_text(
        f"open({str(root / 'PWNED')!r}, 'w').write('code ran')\n"
        "def fn(outputs, targets):\n    return (outputs ** 2).sum(-1)\n"
    )

    # ---- checkpoints
    bad = root / "ckpt"
    bad.mkdir(exist_ok=True)
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "short.safetensors").write_bytes(b"abc")
    (bad / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    (bad / "not_json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    _raw_safetensors(bad / "header_list.safetensors", [1, 2])
    _raw_safetensors(bad / "entry_bad.safetensors", {"w": {"dtype": "F32"}})
    _raw_safetensors(bad / "binary_header.safetensors", {}, b"")
    (bad / "binary_header.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\x00\x01")
    h = _good_header()
    h["net.0.weight"]["dtype"] = "Q7"
    _raw_safetensors(bad / "unknown_dtype.safetensors", h, payload)
    h = _good_header()
    h["net.0.bias"]["data_offsets"] = [100, 132]
    _raw_safetensors(bad / "overlap.safetensors", h, payload)
    h = _good_header()
    h["net.0.bias"]["data_offsets"] = [192, 200]
    _raw_safetensors(bad / "bytesize.safetensors", h, payload)
    h = _good_header()
    h["net.0.bias"]["shape"] = [-8]
    _raw_safetensors(bad / "negative_shape.safetensors", h, payload)
    _raw_safetensors(bad / "truncated.safetensors", _good_header(), payload[:100])
    for tag, n in (("1e9", 10**9), ("1e12", 10**12)):
        h = _good_header(**_meta())
        h["net.0.weight"] = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
        _raw_safetensors(bad / f"declared_{tag}.safetensors", h, payload)
        h = _good_header(**_meta())
        h["net.0.weight"] = {"dtype": "X9", "shape": [n], "data_offsets": [0, 192]}
        _raw_safetensors(bad / f"declared_{tag}_unknown_dtype.safetensors", h, payload)
    for tag, meta in {
        "meta_string": "gmcurv.loss=mse",
        "meta_list": ["gmcurv.arch", "mlp"],
        "meta_int_value": {"gmcurv.arch": "mlp:tanh", "gmcurv.k": 3},
    }.items():
        h = _good_header()
        h["__metadata__"] = meta
        _raw_safetensors(bad / f"{tag}.safetensors", h, payload)
    metas = {
        "loss_file": _meta(**{"gmcurv.loss": f"{root / 'evil.py'}:fn"}),
        "loss_relfile": _meta(**{"gmcurv.loss": "evil.py:fn"}),
        "loss_module": _meta(**{"gmcurv.loss": "os.path:join"}),
        "loss_module_short": _meta(**{"gmcurv.loss": "os:system"}),
        "loss_unknown": _meta(**{"gmcurv.loss": "hinge"}),
        "arch_file": _meta(**{"gmcurv.arch": f"{root / 'evil.py'}:fn"}),
        "arch_module": _meta(**{"gmcurv.arch": "collections:OrderedDict"}),
        "arch_unknown": _meta(**{"gmcurv.arch": "resnet"}),
        "arch_config_list": _meta(**{"gmcurv.arch_config": "[1, 2]"}),
        "arch_config_bad_json": _meta(**{"gmcurv.arch_config": "{nope"}),
        "arch_config_activation": _meta(
            **{"gmcurv.arch": "mlp", "gmcurv.arch_config": '{"activation": "swishy"}'}
        ),
        "arch_activation": _meta(**{"gmcurv.arch": "mlp:swishy"}),
        "other_key_code": _meta(**{"gmcurv.hook": "evil.py:fn"}),
        "loss_mse_classifier": _meta(**{"gmcurv.loss": "mse"}),
    }
    for tag, meta in metas.items():
        save_file(state, str(bad / f"{tag}.safetensors"), metadata=meta)
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["net.0.weight"][0, 0] = float("nan")
    save_file(nan_state, str(bad / "nan_weights.safetensors"), metadata=_meta())
    save_file(
        {k: v for k, v in state.items() if k != "net.2.bias"},
        str(bad / "missing_key.safetensors"),
        metadata=_meta(),
    )
    save_file(
        {**state, "extra.weight": torch.zeros(2)},
        str(bad / "unexpected_key.safetensors"),
        metadata=_meta(),
    )
    save_file(
        {**state, "net.0.bias": torch.zeros(5)},
        str(bad / "shape_mismatch.safetensors"),
        metadata=_meta(),
    )
    save_file(
        {**state, "net.0.weight": torch.zeros(8, 6, dtype=torch.int64)},
        str(bad / "int_weights.safetensors"),
        metadata=_meta(),
    )
    save_file({}, str(bad / "no_tensors.safetensors"), metadata=_meta())
    torch.save(state, bad / "pickle.pt")
    (bad / "empty_dir").mkdir(exist_ok=True)
    (bad / "two").mkdir(exist_ok=True)
    for name in ("a", "b"):
        save_file(state, str(bad / "two" / f"{name}.safetensors"), metadata=_meta())

    # ---- config.json beside weights (Hugging Face layout)
    sample = Path(__file__).resolve().parents[2] / "sample_models/tiny_gpt"
    base = json.loads((sample / "config.json").read_text())
    cfgs = {
        "cfg_n_head_0": {**base, "n_head": 0},
        "cfg_n_head_7": {**base, "n_head": 7},
        "cfg_n_head_str": {**base, "n_head": "four"},
        "cfg_activation": {**base, "activation_function": "swishy"},
        "cfg_model_type": {**base, "model_type": "resnet9000"},
        "cfg_list": [1, 2, 3],
        "cfg_bad_json": None,
    }
    for tag, cfg in cfgs.items():
        d = root / tag
        d.mkdir(exist_ok=True)
        if not (d / "model.safetensors").exists():
            os.link(sample / "model.safetensors", d / "model.safetensors") if _same_fs(
                sample, d
            ) else shutil.copy(sample / "model.safetensors", d / "model.safetensors")
        (d / "config.json").write_text("{nope" if cfg is None else json.dumps(cfg))
    d = root / "cfg_mlp"  # an MLP with a config.json beside it (sidecar input)
    d.mkdir(exist_ok=True)
    save_file(state, str(d / "model.safetensors"), metadata=_meta())
    (d / "config.json").write_text(json.dumps({"note": "read beside the model"}))

    # ---- data
    dd = root / "data"
    dd.mkdir(exist_ok=True)
    np.savez(dd / "empty.npz")
    np.savez(dd / "good.npz", inputs=x.numpy(), targets=y.numpy())
    raw = (dd / "good.npz").read_bytes()
    (dd / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    np.save(dd / "good.npy", x.numpy())
    raw = (dd / "good.npy").read_bytes()
    (dd / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    np.save(dd / "object.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(dd / "object.npz", inputs=np.array([{"a": 1}], dtype=object), targets=np.array([0]))
    header = ",".join(f"f{i}" for i in range(6)) + ",label\n"
    rows = "".join(
        ",".join(f"{v:.4f}" for v in r) + f",{int(t)}\n"
        for r, t in zip(x.tolist(), y.tolist(), strict=True)
    )
    (dd / "good.csv").write_text(header + rows)
    (dd / "strings.csv").write_text(header + "a,b,c,d,e,f,1\n" * 5)
    (dd / "ragged.csv").write_text(header + "1,2,3\n1,2,3,4,5,6,0\n")
    (dd / "one_column.csv").write_text("label\n0\n1\n2\n")
    (dd / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (dd / "empty.csv").write_text("")
    (dd / "header_only.csv").write_text(header)
    (dd / "float_labels.csv").write_text(
        header + "".join(",".join(["0.1"] * 6) + f",{t}\n" for t in ("6.5", "5.5", "1.0"))
    )
    (dd / "float_labels_mid.csv").write_text(
        header + "".join(",".join(["0.1"] * 6) + f",{t}\n" for t in ("0.5", "1.5", "1.0"))
    )
    (dd / "nan.csv").write_text(
        header + ",".join(["nan"] * 6) + ",1\n" + ",".join(["0.5"] * 6) + ",0\n"
    )
    (dd / "labels_range.csv").write_text(
        header + ",".join(["0.5"] * 6) + ",7\n" + ",".join(["0.5"] * 6) + ",-1\n"
    )
    (dd / "text.txt").write_text("hello")
    (dd / "empty_dir").mkdir(exist_ok=True)
    save_file({"inputs": x.contiguous()}, str(dd / "no_targets.safetensors"))
    save_file(
        {"inputs": torch.randn(40, 5), "targets": y.contiguous()},
        str(dd / "wrong_width.safetensors"),
    )
    save_file(
        {"inputs": x.contiguous(), "targets": y[:10].contiguous()},
        str(dd / "count_mismatch.safetensors"),
    )
    save_file(
        {"inputs": torch.full((4, 6), float("inf")), "targets": y[:4].contiguous()},
        str(dd / "inf_inputs.safetensors"),
    )
    save_file(
        {"inputs": x[:0].contiguous(), "targets": y[:0].contiguous()},
        str(dd / "zero_rows.safetensors"),
    )
    (dd / "corrupt.safetensors").write_bytes(b"\x00" * 7)

    # ---- reports for check
    rd = root / "reports"
    rd.mkdir(exist_ok=True)
    est = {"value": 2.0, "stderr": None, "n_samples": 40, "method": "exact", "converged": True}
    good = {
        "schema_version": 1,
        "results": {"fisher": {"trace": est, "eigenvalues": [1.0, 0.5], "type": "empirical"}},
    }
    (rd / "good.json").write_text(json.dumps(good))
    (rd / "not_json.json").write_text("{nope")
    (rd / "list.json").write_text("[1, 2]")
    (rd / "results_int.json").write_text(json.dumps({"results": 3}))
    (rd / "results_list.json").write_text(json.dumps({"results": [1, 2]}))
    (rd / "huge_int.json").write_text('{"results": {"fisher": {"trace": ' + "9" * 5000 + "}}}")
    (rd / "deep.json").write_text('{"results": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}")
    (rd / "binary.json").write_bytes(bytes(range(256)))
    (rd / "empty.json").write_text("")

    # ---- outputs
    (root / "a_file").write_text("not a directory")
    ro = root / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    (root / "outdir").mkdir(exist_ok=True)
    # ---- config files in a working directory
    for tag, text in {
        "cwd_bad_toml": "k = [",
        "cwd_bad_value": "k = 'many'\n",
        "cwd_bad_range": "[eigen]\nk = 0\n",
    }.items():
        (root / tag).mkdir(exist_ok=True)
        (root / tag / "gmcurv.toml").write_text(text)


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b.parent if not b.exists() else b).st_dev
    except OSError:
        return False


# ----------------------------------------------------------------------------- the cases
ANALYSES = ("trace", "eigen", "spectrum", "saliency", "landscape")
M, D = "{root}/M.safetensors", "{root}/D"


def _checkpoint_cases() -> list[Case]:
    c = "{root}/ckpt/"
    table = {
        # name: (fragment, exit)
        "empty": ("too short", 2),
        "short": ("too short", 2),
        "huge_header": ("not a safetensors file", 2),
        "not_json": ("corrupt safetensors header", 2),
        "header_list": ("corrupt safetensors header", 2),
        "entry_bad": ("corrupt entry", 2),
        "binary_header": ("corrupt safetensors header", 2),
        "unknown_dtype": ("unknown dtype", 2),
        "overlap": ("overlap", 2),
        "bytesize": ("byte size", 2),
        "negative_shape": ("negative", 2),
        "truncated": ("truncated", 2),
        "declared_1e9": ("declared_1e9", 2),
        "declared_1e12": ("declared_1e12", 2),
        "declared_1e9_unknown_dtype": ("unknown dtype", 2),
        "declared_1e12_unknown_dtype": ("unknown dtype", 2),
        "meta_string": ("__metadata__", 2),
        "meta_list": ("__metadata__", 2),
        "meta_int_value": ("gmcurv.k", 2),
        "loss_file": ("gmcurv.loss", 2),
        "loss_relfile": ("gmcurv.loss", 2),
        "loss_module": ("gmcurv.loss", 2),
        "loss_module_short": ("gmcurv.loss", 2),
        "loss_unknown": ("gmcurv.loss", 2),
        "arch_file": ("gmcurv.arch", 2),
        "arch_module": ("gmcurv.arch", 2),
        "arch_unknown": ("resnet", 2),
        "arch_config_list": ("gmcurv.arch_config", 2),
        "arch_config_bad_json": ("gmcurv.arch_config", 2),
        "arch_config_activation": ("swishy", 2),
        "arch_activation": ("swishy", 2),
        "other_key_code": ("gmcurv.hook", 2),
        "nan_weights": ("NaN", 2),
        "missing_key": ("", 0),  # a bias-free last layer: a valid MLP
        "unexpected_key": ("unexpected_key", 2),
        "shape_mismatch": ("shape_mismatch", 2),
        "int_weights": ("dtype", 2),
        "no_tensors": ("no_tensors", 2),
        "pickle": ("pickle", 2),
        "empty_dir": ("no .safetensors", 2),
        "two": ("several", 2),
        "nonexistent": ("no such file", 2),
    }
    cases = []
    for name, (frag, code) in table.items():
        path = c + name + ("" if name in ("empty_dir", "two", "pickle") else ".safetensors")
        if name == "pickle":
            path += ".pt"
        cases.append(Case(f"ckpt-{name}-info", ("info", path), code, frag))
        if name == "two":  # `trace` reads a directory of checkpoints as a series (exit 0)
            cases.append(Case("ckpt-two-trace", ("trace", path, D, "-q"), 0, ""))
            continue
        cases.append(Case(f"ckpt-{name}-trace", ("trace", path, D, "-q"), code, frag))
    for cmd in ("eigen", "spectrum", "saliency", "landscape"):
        for name in ("loss_file", "meta_list", "declared_1e12", "overlap"):
            frag, code = table[name]
            cases.append(
                Case(f"ckpt-{name}-{cmd}", (cmd, c + name + ".safetensors", D, "-q"), code, frag)
            )
    cases.append(
        Case(
            "ckpt-loss_file-lora",
            ("lora", "{root}/nonexistent_adapter", c + "loss_file.safetensors"),
            2,
            "",
        )
    )
    cases.append(
        Case(
            "ckpt-loss-mse-classifier",
            ("trace", c + "loss_mse_classifier.safetensors", D, "-q"),
            2,
            "mse",
        )
    )
    cases.append(Case("ckpt-nometa", ("trace", "{root}/nometa.safetensors", D, "-q"), 2, "--arch"))
    for tag, frag in {
        "cfg_n_head_0": "config.json",
        "cfg_n_head_7": "config.json",
        "cfg_n_head_str": "config.json",
        "cfg_activation": "config.json",
        "cfg_model_type": "resnet9000",
        "cfg_list": "config.json",
        "cfg_bad_json": "config.json",
    }.items():
        cases.append(Case(f"{tag}-info", ("info", "{root}/" + tag), 2, frag))
    for arch, frag in {
        "nonexistent.py:f": "not found",
        "mlp:swishy": "swishy",
        "resnet": "resnet",
        "{root}/user.py:nope": "nope",
        "nomodule_xyz:f": "nomodule_xyz",
        ":": "--arch",
    }.items():
        cases.append(
            Case(
                f"arch-{arch.split('/')[-1]}",
                ("info", "{root}/nometa.safetensors", "--arch", arch),
                2,
                frag,
            )
        )
    for loss, frag in {
        "hinge": "hinge",
        "nonexistent.py:f": "not found",
        "nomodule_xyz:f": "nomodule_xyz",
    }.items():
        cases.append(Case(f"loss-{loss}", ("trace", M, D, "-q", "--loss", loss), 2, frag))
    return cases


def _data_cases() -> list[Case]:
    d = "{root}/data/"
    table = {
        "empty.npz": "empty.npz",
        "truncated.npz": "truncated.npz",
        "truncated.npy": "truncated.npy",
        "object.npy": "object.npy",
        "object.npz": "object.npz",
        "strings.csv": "strings.csv",
        "ragged.csv": "ragged.csv",
        "one_column.csv": "one_column.csv",
        "binary.csv": "binary.csv",
        "empty.csv": "empty.csv",
        "header_only.csv": "header_only.csv",
        "float_labels.csv": "float_labels.csv",
        "float_labels_mid.csv": "float_labels_mid.csv",
        "nan.csv": "nan.csv",
        "labels_range.csv": "labels_range.csv",
        "text.txt": "text.txt",
        "empty_dir": "empty_dir",
        "no_targets.safetensors": "no_targets.safetensors",
        "wrong_width.safetensors": "wrong_width.safetensors",
        "count_mismatch.safetensors": "count_mismatch.safetensors",
        "inf_inputs.safetensors": "inf_inputs.safetensors",
        "zero_rows.safetensors": "zero_rows.safetensors",
        "corrupt.safetensors": "corrupt.safetensors",
        "nonexistent.npz": "nonexistent.npz",
    }
    cases = []
    for name, frag in table.items():
        for cmd in ANALYSES:
            if cmd != "trace" and name not in (
                "truncated.npz",
                "strings.csv",
                "object.npy",
                "wrong_width.safetensors",
                "float_labels.csv",
            ):
                continue
            pending = ""
            cases.append(
                Case(f"data-{name}-{cmd}", (cmd, M, d + name, "-q"), 2, frag, pending=pending)
            )
    cases.append(
        Case(
            "data-eval-data-bad",
            ("saliency", M, D, "-q", "--eval-data", d + "ragged.csv"),
            2,
            "ragged.csv",
        )
    )
    cases.append(Case("data-missing", ("trace", M), 2, "DATA"))
    return cases


def _option_cases() -> list[Case]:
    cases = []
    base = {cmd: (cmd, M, D, "-q") for cmd in ANALYSES}
    for cmd, opt, value, frag in [
        ("eigen", "--k", "0", "--k"),
        ("eigen", "--k", "-1", "--k"),
        ("eigen", "--k", "100000", "--k"),
        ("eigen", "--k", "abc", "--k"),
        ("trace", "--k", "-1", "--k"),
        ("trace", "--probes", "0", "--probes"),
        ("spectrum", "--probes", "0", "--probes"),
        ("trace", "--samples", "0", "--samples"),
        ("trace", "--samples", "-1", "--samples"),
        ("eigen", "--k", "84", "--k"),
        ("trace", "--batch-size", "0", "--batch-size"),
        ("trace", "--batch-size", "-5", "--batch-size"),
        ("trace", "--dtype", "float16", "--dtype"),
        ("trace", "--tol", "-1", "--tol"),
        ("trace", "--tol", "nan", "--tol"),
        ("eigen", "--tol", "nan", "--tol"),
        ("eigen", "--tol", "inf", "--tol"),
        ("trace", "--mc-samples", "0", "--mc-samples"),
        ("trace", "--max-iters", "0", "--max-iters"),
        ("trace", "--curvature", "curly", "--curvature"),
        ("trace", "--fisher", "bogus", "--fisher"),
        ("trace", "--method", "magic", "--method"),
        ("trace", "--device", "tpu9", "--device"),
        ("trace", "--device", "cuda:7", "--device"),
        ("trace", "--mode", "dance", "--mode"),
        ("trace", "--layers", "nothing_matches*", "--layers"),
        ("trace", "--seed", "abc", "--seed"),
        ("saliency", "--damping", "-1", "--damping"),
        ("saliency", "--damping", "nan", "--damping"),
        ("saliency", "--damping", "inf", "--damping"),
        ("saliency", "--rounds", "0", "--rounds"),
        ("saliency", "--prune", "1.5", "--prune"),
        ("saliency", "--prune", "-0.1", "--prune"),
        ("saliency", "--prune", "nan", "--prune"),
        ("saliency", "--levels", "2", "--levels"),
        ("saliency", "--levels", "a,b", "--levels"),
        ("saliency", "--levels", "0.5,nan", "--levels"),
        ("saliency", "--levels", "", "--levels"),
        ("saliency", "--criterion", "vibes", "--criterion"),
        ("spectrum", "--sigma", "0", "--sigma"),
        ("spectrum", "--points", "2", "--points"),
        ("spectrum", "--steps", "0", "--steps"),
        ("landscape", "--steps", "100000", "--steps"),
        ("landscape", "--steps", "2", "--steps"),
        ("landscape", "--steps", "0", "--steps"),
        ("landscape", "--steps", "-3", "--steps"),
        ("landscape", "--range=-1e308:1e308", None, "--range"),
        ("landscape", "--range", "a:b", "--range"),
        ("landscape", "--range", "1:1", "--range"),
        ("landscape", "--range", "2:1", "--range"),
        ("landscape", "--range", "nan:1", "--range"),
        ("landscape", "--range", "0:inf", "--range"),
        ("landscape", "--range", "5", "--range"),
        ("landscape", "--directions", "sideways", "--directions"),
        ("landscape", "--to", "{root}/ckpt/loss_file.safetensors", "gmcurv.loss"),
        ("landscape", "--to", "{root}/ckpt/shape_mismatch.safetensors", "shape"),
        ("landscape", "--to", "{root}/nonexistent.safetensors", "nonexistent"),
    ]:
        args = (*base[cmd], opt) if value is None else (*base[cmd], opt, value)
        tag = f"opt-{cmd}{opt}={value}" if value is not None else f"opt-{cmd}{opt}"
        cases.append(Case(tag, args, 2, frag))
    for cmd in ("trace", "eigen", "spectrum", "saliency", "landscape", "lora"):
        for value in ("text", "1.2.3GB", "1e999GB", "eGB", "-1GB", "0", "nanGB", "4XB"):
            args = ("lora", "{root}/nonexistent_adapter") if cmd == "lora" else base[cmd]
            if cmd != "trace" and value not in ("text", "1e999GB", "-1GB"):
                continue
            cases.append(
                Case(
                    f"opt-{cmd}--max-memory={value}",
                    (*args, "--max-memory", value),
                    2,
                    "--max-memory",
                )
            )
    for rule in (
        "fisher.eigenvalues[",
        "fisher.trace >",
        "",
        "fisher.trace > abc",
        "fisher.trace >> 1",
        "a.b.c > 1",
    ):
        cases.append(
            Case(
                f"opt-fail-if={rule}",
                (*base["trace"], "--fail-if", rule),
                2,
                "--fail-if" if rule != "a.b.c > 1" else "a.b.c",
            )
        )
    cases.append(
        Case(
            "opt-learned-transformer",
            (
                "trace",
                "{sample}/tiny_gpt",
                "{sample}/tiny_gpt/data",
                "--method",
                "learned",
                "-q",
                "-n",
                "8",
            ),
            2,
            "--method exact",
        )
    )
    cases.append(Case("opt-env-k", base["eigen"], 2, "GMCURV_K", env={"GMCURV_K": "abc"}))
    cases.append(
        Case(
            "opt-env-max-memory",
            base["trace"],
            2,
            "--max-memory",
            env={"GMCURV_MAX_MEMORY": "lots"},
        )
    )
    cases.append(Case("opt-unknown-option", (*base["trace"], "--frobnicate"), 2, "--frobnicate"))
    cases.append(Case("opt-unknown-command", ("frobnicate",), 2, "frobnicate"))
    cases.append(Case("opt-extra-arg", ("info", M, D), 2, ""))
    for tag in ("cwd_bad_toml", "cwd_bad_value", "cwd_bad_range"):
        cases.append(
            Case(
                f"config-{tag}",
                ("eigen", M, D, "-q"),
                2,
                "gmcurv.toml" if tag == "cwd_bad_toml" else "k",
                env={"GMCURV_NO_CONFIG": ""},
                cwd=tag,
            )
        )
    return cases


def _output_cases() -> list[Case]:
    cases = []
    out = "{root}/outdir/"
    for cmd, opt, target, frag in [
        ("info", "-o", M, "overwrite"),
        ("info", "-o", "{root}/cfg_mlp/config.json", "overwrite"),  # read beside the model
        ("trace", "-o", M, "overwrite"),
        ("trace", "-o", "{root}/D/a.safetensors", "overwrite"),
        ("trace", "-o", "{root}/D/new.json", "overwrite"),
        ("trace", "-o", "{root}/a_file/out.json", "not a directory"),
        ("trace", "-o", "{root}/nodir/out.json", "does not exist"),
        ("trace", "-o", "{root}/outdir", "directory"),
        ("trace", "--plot", M, ".safetensors"),
        ("trace", "--plot", "{root}/D/p.png", "overwrite"),
        ("trace", "--plot", "{root}/a_file/p.png", "not a directory"),
        ("trace", "--plot", out + "p.txt", ".txt"),
        ("eigen", "--save-vectors", M, "overwrite"),
        ("eigen", "--save-vectors", "{root}/a_file/v.safetensors", "not a directory"),
        ("eigen", "--save-vectors", out + "v.npz", "--save-vectors"),
        ("spectrum", "-o", "{root}/a_file/o.json", "not a directory"),
        ("landscape", "--save-grid", "{root}/D/g.npz", "overwrite"),
        ("landscape", "--save-grid", "{root}/a_file/g.npz", "not a directory"),
        ("landscape", "--save-grid", out + "g.txt", "--save-grid"),
        ("saliency", "--report", M, "overwrite"),
        ("saliency", "-o", "{root}/a_file/r.json", "not a directory"),
        ("saliency", "-o", out + "r.safetensors", "--save-pruned"),  # -o is the report
        ("saliency", "--save-pruned", out + "p.safetensors", "--prune"),  # needs --prune
    ]:
        model = "{root}/cfg_mlp/model.safetensors" if "cfg_mlp" in target else M
        args = (cmd, model) if cmd == "info" else (cmd, model, D, "-q")
        outputs = () if "overwrite" in frag else (target,)
        cases.append(
            Case(
                f"out-{cmd}{opt}={target.replace('{root}/', '')}",
                (*args, opt, target),
                2,
                frag,
                outputs=outputs,
            )
        )
    # the plot must be refused before -o, the pruned checkpoint or the grid is written
    cases += [
        Case(
            "out-plot-first-o",
            ("trace", M, D, "-q", "-o", out + "t1.json", "--plot", M),
            2,
            "",
            outputs=(out + "t1.json",),
        ),
        Case(
            "out-plot-input-prune",
            (
                "saliency",
                M,
                D,
                "-q",
                "--prune",
                "0.5",
                "--save-pruned",
                out + "p.safetensors",
                "--plot",
                "{root}/D/x.png",
            ),
            2,
            "overwrite",
            outputs=(out + "p.safetensors",),
        ),
        Case(
            "out-prune-onto-model",
            ("saliency", M, D, "-q", "--prune", "0.5", "--save-pruned", M),
            2,
            "overwrite",
        ),
        Case(
            "out-prune-onto-data",
            ("saliency", M, D, "-q", "--prune", "0.5", "--save-pruned", "{root}/D/a.safetensors"),
            2,
            "overwrite",
        ),
        Case(
            "out-prune-parent-file",
            (
                "saliency",
                M,
                D,
                "-q",
                "--prune",
                "0.5",
                "--save-pruned",
                "{root}/a_file/p.safetensors",
            ),
            2,
            "not a directory",
        ),
        Case(
            "out-same-o-report",
            (
                "saliency",
                M,
                D,
                "-q",
                "--prune",
                "0.5",
                "--save-pruned",
                out + "s.safetensors",
                "--report",  # the deprecated name of -o
                out + "s.safetensors",
            ),
            2,
            "",
            outputs=(out + "s.safetensors",),
        ),
        Case(
            "out-grid-and-o-same",
            ("landscape", M, D, "-q", "--save-grid", out + "same.npz", "-o", out + "same.npz"),
            2,
            "",
            outputs=(out + "same.npz",),
        ),
        Case(
            "out-readonly",
            ("trace", M, D, "-q", "-o", "{root}/readonly/o.json"),
            2,
            "read-only",
            outputs=("{root}/readonly/o.json",),
            root_only=False,
        ),
        Case(
            "out-lora-export-onto-model",
            ("lora", "{root}/nonexistent_adapter", M, "--export", M),
            2,
            "",
        ),
    ]
    return cases


def _check_cases() -> list[Case]:
    r = "{root}/reports/"
    cases = []
    for name, rule, code, frag in [
        ("nonexistent.json", "fisher.trace > 1", 2, "nonexistent.json"),
        ("not_json.json", "fisher.trace > 1", 2, "not_json.json"),
        ("list.json", "fisher.trace > 1", 2, "list.json"),
        ("results_int.json", "fisher.trace > 1", 2, "results_int.json"),
        ("results_list.json", "fisher.trace > 1", 2, "results_list.json"),
        ("huge_int.json", "fisher.trace > 1", 2, "huge_int.json"),
        ("deep.json", "fisher.trace > 1", 2, "deep.json"),
        ("binary.json", "fisher.trace > 1", 2, "binary.json"),
        ("empty.json", "fisher.trace > 1", 2, "empty.json"),
        ("good.json", "fisher.type > 1", 2, "fisher.type"),
        ("good.json", "fisher.eigenvalues[-1] > 1", 0, ""),
        ("good.json", "fisher.eigenvalues[-3] > 1", 2, "fisher.eigenvalues"),
        ("good.json", "fisher.eigenvalues[5] > 1", 2, "fisher.eigenvalues"),
        ("good.json", "fisher.eigenvalues[", 2, "fisher.eigenvalues["),
        ("good.json", "fisher.missing > 1", 2, "fisher.missing"),
        ("good.json", "", 2, ""),
        ("good.json", "fisher.trace > 1", 1, ""),
        ("good.json", "fisher.trace > 10", 0, ""),
    ]:
        tag = f"check-{name}-{rule}"
        cases.append(Case(tag, ("check", r + name, rule), code, frag))
    return cases


def all_cases() -> list[Case]:
    """Every case, ids unique."""
    cases = _checkpoint_cases() + _data_cases() + _option_cases() + _output_cases() + _check_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases


# ------------------------------------------------------------------------------ running
def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (inputs must never change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expand(case: Case, root: Path) -> list[str]:
    sample = Path(__file__).resolve().parents[2] / "sample_models"
    return [a.replace("{root}", str(root)).replace("{sample}", str(sample)) for a in case.args]


def run_case(case: Case, root: Path):
    """Run in-process with CliRunner; returns (exit code, output text, traceback or None)."""
    import traceback

    from typer.testing import CliRunner

    from gmcurv.cli.app import app

    env = {"GMCURV_NO_CONFIG": "1", "COLUMNS": "200", **case.env}
    old = os.getcwd()
    os.chdir(root / case.cwd if case.cwd else root / "outdir")
    try:
        result = CliRunner().invoke(app, expand(case, root), env=env)
    finally:
        os.chdir(old)
    tb = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output, tb


def classify(case: Case, root: Path, before: dict[str, str] | None = None) -> tuple[str, str]:
    """('clean'|'traceback'|'wrong exit'|'input modified'|'partial output', detail).

    `before`: the inputs' sha256 (computed here when not given)."""
    before = before if before is not None else sha256_tree(root)
    code, text, tb = run_case(case, root)
    after = sha256_tree(root)
    changed = [k for k in before if after.get(k) != before[k]]
    new = [k for k in after if k not in before]
    for k in new:  # leave the corpus as it was for the next case
        (root / k).unlink(missing_ok=True)
    if "PWNED" in new:
        return "input modified", "code named by a checkpoint ran"
    if tb is not None or code == 4 or "Traceback" in text:
        return "traceback", (tb or text)[-600:]
    if changed:
        return "input modified", f"{changed}"
    stray = [k for k in new if k.endswith(".tmp") or any(k in o for o in case.outputs) or code != 0]
    if stray:
        return "partial output", f"{stray}"
    if code != case.exit:
        return "wrong exit", f"exit {code}, expected {case.exit}: {text[-400:]}"
    if case.exit == 2 and case.fragment and case.fragment not in text:
        return "wrong exit", f"message lacks {case.fragment!r}: {text[-400:]}"
    if case.exit == 2 and "hint" not in text.lower():
        return "wrong exit", f"no hint: {text[-400:]}"
    return "clean", ""


def main() -> None:  # pragma: no cover - the summary for the issue's closing note
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        build_inputs(root)
        counts: Counter[str] = Counter()
        only = sys.argv[1] if len(sys.argv) > 1 else ""
        for case in all_cases():
            if only not in case.id:
                continue
            if case.root_only is False and os.geteuid() == 0:
                continue
            kind, detail = classify(case, root)
            counts[kind] += 1
            if kind != "clean":
                last = detail.strip().splitlines()[-1] if detail.strip() else ""
                print(f"[{kind}] {case.id}: {last}")
        (root / "readonly").chmod(0o755)
        print(dict(counts), "total", sum(counts.values()))


if __name__ == "__main__":
    main()
