#!/usr/bin/env bash
# Checks that `pip install ./crates/py` (maturin: this package alone, with its `python` feature) and
# `cargo test --workspace` select the same features of every dependency they share, so the wheel
# reuses the test build's compilation instead of building serde, burn and vigil a second time.
# On a difference it names the crates and features to add to crates/py/Cargo.toml's unification list.
set -euo pipefail
cd "$(dirname "$0")/../../.."
tree() { cargo tree --locked --prefix none -f '{p}|{f}' "$@" | sed 's/ (\*)//g' | sort -u; }
wheel=$(tree -p vigil-py --features python -e normal,build)
workspace=$(tree --workspace -e normal,build,dev)
python3 - "$wheel" "$workspace" <<'PY'
import sys

def selections(text):
    """package -> the set of feature lists it is built with (one per host/target build)."""
    out = {}
    for line in text.splitlines():
        if "|" in line:
            package, features = line.split("|", 1)
            out.setdefault(package.strip(), set()).add(features)
    return out

wheel, workspace = selections(sys.argv[1]), selections(sys.argv[2])
shared = [p for p in wheel.keys() & workspace.keys() if not p.startswith("vigil")]
differ = sorted(p for p in shared if wheel[p] != workspace[p])
for p in differ:
    print(f"{p}: the wheel selects {sorted(wheel[p])}, the workspace {sorted(workspace[p])}", file=sys.stderr)
if differ:
    sys.exit(f"{len(differ)} shared dependencies are built with other features by the wheel: name the union in crates/py/Cargo.toml")
print(f"feature unification: the wheel and the workspace select the same features of {len(shared)} shared dependencies")
PY
