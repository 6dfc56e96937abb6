"""No pickled code runs: `library/safe_unpickle.py` is the only place that unpickles.

The tree is grepped for direct `torch.load` / `pickle.load(s)` / `weights_only=False` /
`allow_pickle=True` calls outside the restricted loader (tests may use them on files they wrote
themselves). A file that needs a class outside the allowlist is refused with one line naming it.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.safe_unpickle import load_pickle_checkpoint

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {Path("library/safe_unpickle.py")}
SKIP_DIRS = {"tests", ".git", "build", "dist", ".venv", "venv", "__pycache__"}
UNSAFE = [
    re.compile(r"\btorch\.load\s*\("),
    re.compile(r"\bfrom\s+torch\s+import\s+[^\n]*\bload\b"),
    re.compile(r"\b(c?[Pp]ickle|dill|joblib)\.loads?\s*\("),
    re.compile(r"\bfrom\s+(c?pickle|dill|joblib)\s+import\s+[^\n]*\bloads?\b"),
    re.compile(r"\bUnpickler\s*\("),
    re.compile(r"weights_only\s*=\s*False"),
    re.compile(r"allow_pickle\s*=\s*True"),
]


def unsafe_calls(root: Path) -> list[str]:
    """`path:line: text` of every unsafe-load pattern in the .py files under `root`."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel in ALLOWED or SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(pattern.search(code) for pattern in UNSAFE):
                hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


def test_tree_has_no_unsafe_loads():
    assert unsafe_calls(REPO) == []


@pytest.mark.parametrize("line", [
    "state = torch.load(path, map_location='cpu')",
    "x = pickle.loads(blob)",
    "from pickle import load",
    "sd = torch.load(p, weights_only=False)",
    "arr = np.load(p, allow_pickle=True)",
])
def test_scanner_finds_unsafe_loads(tmp_path, line):
    """The grep above is only worth something if it catches each pattern."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(f"import torch\n{line}\n", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(f"{line}\n", encoding="utf-8")  # tests are exempt
    assert unsafe_calls(tmp_path) == [f"{Path('pkg/mod.py')}:2: {line}"]


def test_refused_class_is_named_in_one_line(tmp_path):
    """Old training scripts pickled their argparse Namespace into checkpoints: refused, named."""
    path = tmp_path / "with_args.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, str(path))
    with pytest.raises(UserError) as info:
        load_pickle_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert "argparse.Namespace" in message and str(path) in message


def test_lora_pt_goes_through_the_restricted_loader(tmp_path):
    """A `.pt` LoRA holding code is refused like a model checkpoint (networks.lora reads it)."""
    from networks.lora import load_lora_state_dict

    good = tmp_path / "good.pt"
    torch.save({"lora_unet_x.alpha": torch.tensor(4.0)}, str(good))
    assert torch.equal(load_lora_state_dict(good)["lora_unet_x.alpha"], torch.tensor(4.0))
    bad = tmp_path / "bad.pt"
    torch.save({"lora_unet_x.alpha": argparse.Namespace(x=1)}, str(bad))
    with pytest.raises(UserError, match=r"bad\.pt: refusing to load: the pickle references 'argparse\.Namespace'"):
        load_lora_state_dict(bad)
