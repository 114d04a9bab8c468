"""constraints.txt (what `make install` installs with) pins every dependency the project declares,
inside the range pyproject.toml allows, by version only: a pin outside a range makes the install
fail on every machine, and a `name @ file://...` line only works on the machine that wrote it."""

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mmctr_assets import settings

REPO = settings.PACKAGE_DIR.parent
# torch is chosen by TORCH_SPEC (CPU or CUDA build), so neither it nor what a CUDA build pulls is pinned
LEFT_TO_TORCH_SPEC = re.compile(r"^(torch|triton|nvidia-.+)$")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), (
                f"constraints.txt: {line!r} is not a plain `name==version` pin"
            )
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_declared_dependency_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if LEFT_TO_TORCH_SPEC.match(name):
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name}: run `make constraints`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req}: run `make constraints`"
        )
    assert not [name for name in pins if LEFT_TO_TORCH_SPEC.match(name)], "constraints.txt pins what TORCH_SPEC chooses"
