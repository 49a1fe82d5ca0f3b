"""SGLang's own pure-Python LoRA loading code, run from the pinned wheel (never copied here).

SGLang cannot be installed beside these tests (its wheel pins another torch and needs CUDA
packages), so `scripts/venv.sh` downloads the wheel the slime image pins (0.5.15.post1, pinned
in `constraints/`) into `<venv>/share/megatron-lora/` without installing it, and this module
runs the parts of it that the adapter sync's payload goes through on the server:

    with sglang_wheel.lora_modules() as sg:   # SGLang's modules, served from the wheel
        sg.LoRAConfig, sg.LoRAAdapter, sg.get_normalized_target_modules, ...
    Serializer = sglang_wheel.serializer()    # MultiprocessingSerializer (and its unpickler)

`sglang/__init__.py` and `srt/utils/common.py` import triton and torchvision at the top, so the
packages around the LoRA modules are empty stand-ins, and the few names the LoRA modules import
but the loading path never calls (the model loader, the LoRA kernel backend, the load config)
are placeholders that raise if used. The serializer's two classes are taken out of
`srt/utils/common.py` by `ast` and run on their own, with the stdlib base64 for pybase64.
`missing_reason()` says why none of this can run (for a pytest skip).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import glob
import importlib.abc
import importlib.machinery
import io
import os
import pickle
import sys
import types
import zipfile
from multiprocessing.reduction import ForkingPickler

VERSION = "0.5.15.post1"
WHEEL_ENV = "MEGATRON_LORA_SGLANG_WHEEL"

# Real modules, run from the wheel: adapter-config parsing, weight-name normalisation, layer ids.
REAL = ("sglang.srt.lora.lora_config", "sglang.srt.lora.utils", "sglang.srt.lora.lora",
        "sglang.srt.layers.utils.common")


def wheel_path() -> str | None:
    if os.environ.get(WHEEL_ENV):
        return os.environ[WHEEL_ENV]
    found = sorted(glob.glob(os.path.join(sys.prefix, "share", "megatron-lora",
                                          f"sglang-{VERSION}-*.whl")))
    return found[-1] if found else None


def missing_reason() -> str | None:
    path = wheel_path()
    if path is None or not os.path.isfile(path):
        return (f"no sglang-{VERSION} wheel in {sys.prefix}/share/megatron-lora (make venv "
                f"downloads it) or at ${WHEEL_ENV}")
    return None


def source(path: str) -> str:
    """The text of `sglang/<path>` in the wheel."""
    with zipfile.ZipFile(wheel_path()) as wheel:
        return wheel.read(f"sglang/{path}").decode()


def _file_of(module: str) -> str:
    return module.replace(".", "/")[len("sglang/"):] + ".py"


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"SGLang stand-in {self._name} was used")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotImplementedError(f"SGLang stand-in {self._name}.{attr} was used")


# Names the real modules import that the tensor-loading path never uses.
_PLACEHOLDERS = {
    "sglang.srt.configs.load_config": ("LoadConfig",),
    "sglang.srt.lora.backend.base_backend": ("BaseLoRABackend",),
    "sglang.srt.model_loader.loader": ("DefaultModelLoader",),
    "sglang.srt.utils.hf_transformers_utils": ("AutoConfig",),
    "sglang.srt.model_executor.forward_batch_info": ("ForwardBatch",),
}


class _WheelFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`sglang.*`: the REAL modules from the wheel's source, everything else an empty package
    (or the placeholders above)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != "sglang":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname not in REAL)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        if name in REAL:
            code = compile(source(_file_of(name)), f"sglang-{VERSION}/{_file_of(name)}", "exec")
            exec(code, module.__dict__)
        else:
            module.__path__ = []
            for attr in _PLACEHOLDERS.get(name, ()):
                setattr(module, attr, _Placeholder(f"{name}.{attr}"))
        if name == "sglang.srt.layers.utils":  # its __init__ re-exports common's names
            module.get_layer_id = importlib.import_module(
                "sglang.srt.layers.utils.common").get_layer_id


@contextlib.contextmanager
def lora_modules():
    """SGLang's LoRA loading code, importable as `sglang.*` inside the block; the stand-ins and
    the modules leave `sys.modules` after it."""
    if any(n == "sglang" or n.startswith("sglang.") for n in sys.modules):
        raise RuntimeError("sglang is already imported in this process")
    finder = _WheelFinder()
    sys.meta_path.insert(0, finder)
    try:
        lora = importlib.import_module("sglang.srt.lora.lora")
        utils = importlib.import_module("sglang.srt.lora.utils")
        config = importlib.import_module("sglang.srt.lora.lora_config")
        layers = importlib.import_module("sglang.srt.layers.utils.common")
        yield types.SimpleNamespace(
            LoRAConfig=config.LoRAConfig, LoRAAdapter=lora.LoRAAdapter,
            get_normalized_target_modules=utils.get_normalized_target_modules,
            get_target_module_name=utils.get_target_module_name,
            get_layer_id=layers.get_layer_id)
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
            del sys.modules[name]


class _Pybase64:
    """pybase64's two calls, by the stdlib (the same encoding)."""

    b64encode = staticmethod(base64.b64encode)

    @staticmethod
    def b64decode(data, validate=False):
        return base64.b64decode(data, validate=validate)


def serializer():
    """SGLang's `MultiprocessingSerializer` (with the `SafeUnpickler` its `deserialize` uses),
    compiled from `srt/utils/common.py` in the wheel on their own."""
    tree = ast.parse(source("srt/utils/common.py"))
    wanted = {"SafeUnpickler", "MultiprocessingSerializer"}
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in wanted]
    if {c.name for c in classes} != wanted:
        raise RuntimeError(f"srt/utils/common.py of sglang {VERSION} lacks {wanted}")
    namespace = {"io": io, "pickle": pickle, "pybase64": _Pybase64,
                 "ForkingPickler": ForkingPickler, "__name__": "sglang_wheel_serializer"}
    exec(compile(ast.Module(body=classes, type_ignores=[]), "srt/utils/common.py", "exec"),
         namespace)
    return namespace["MultiprocessingSerializer"]


def class_fields(path: str, class_name: str) -> dict[str, str | None]:
    """`{field: default source or None}` of a class's annotated fields in `sglang/<path>`
    (SGLang's request structs and `ServerArgs` are such classes)."""
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {item.target.id: (ast.unparse(item.value) if item.value else None)
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    raise LookupError(f"no class {class_name} in sglang/{path}")


def http_routes(path: str = "srt/entrypoints/http_server.py") -> set[str]:
    """The POST routes SGLang's HTTP server declares (`@app.post(...)`, `@app.api_route(...)`)."""
    routes = set()
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr in ("post", "api_route") and decorator.args
                        and isinstance(decorator.args[0], ast.Constant)):
                    routes.add(decorator.args[0].value.lstrip("/"))
    return routes
