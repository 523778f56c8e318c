"""No service imports another service's package; the gateway and servekit need no torch (nor
imagekit, the model stages' shared image code)."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SERVICES = ["planner_service", "decoder_service", "gateway"]
MODEL_LIBRARIES = {"torch", "transformers", "diffusers", "vllm", "numpy", "PIL", "imagekit"}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_no_other_service(service):
    imports = imported_top_levels(service)
    for other in SERVICES:
        if other != service:
            assert other not in imports, f"{service} imports {other} in {imports.get(other)}"


@pytest.mark.parametrize("package", ["gateway", "servekit"])
def test_light_packages_import_no_model_code(package):
    imports = imported_top_levels(package)
    assert not MODEL_LIBRARIES & imports.keys(), {k: imports[k] for k in MODEL_LIBRARIES & imports.keys()}


@pytest.mark.parametrize("package", ["servekit", "imagekit"])
def test_shared_packages_import_no_service(package):
    assert not set(SERVICES) & imported_top_levels(package).keys()
