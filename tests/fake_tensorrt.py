"""A stand-in for TensorRT 11's ``tensorrt`` / ``tensorrt.plugin`` (which cannot be installed here), just enough to
run the plugins' ``register_tensorrt_plugin`` functions (the QDP / AOT form, TensorRT 11 only) and call what they
register with concrete shapes; tests/builder/test_build_engine_dir.py adds a builder to it for the TensorRT 11
stage (hopper / blackwell). Used only where no real builder can run: everything TensorRT-RTX can do on CPU
(parse, build, plugin classes, plan headers) is tested with the real TensorRT-RTX (tests/builder/test_tensorrt_rtx.py).

It mirrors the checks of TensorRT's own ``tensorrt.plugin`` validation that can fail silently elsewhere: tensor
arguments annotated ``TensorDesc`` before typed attributes; the autotune and aot_impl parameter lists
(inputs, a subset of the attributes in order, ``outputs``[, ``tactic``]); aot_impl's 4-tuple return
annotation; one autotune type per input and output. Symbolic shapes are plain ints here.
"""

import inspect
import sys
import types
import typing

REGISTRY: dict = {}


class DataType(str):
    pass


class TensorDesc:
    def __init__(self, shape_expr=(), dtype=None):
        self.shape_expr, self.dtype, self.aliased_to = tuple(_Expr(int(s)) for s in shape_expr), dtype, None

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)

    def aliased(self):
        out = self.like()
        out.aliased_to = self
        return out


class _Expr(int):
    """A constant symbolic dimension (int arithmetic, plus the constant_value() of TensorRT's ShapeExpr)."""

    def constant_value(self):
        return int(self)

    def __add__(self, o): return _Expr(int(self) + int(o))
    def __sub__(self, o): return _Expr(int(self) - int(o))
    def __mul__(self, o): return _Expr(int(self) * int(o))
    def __floordiv__(self, o): return _Expr(int(self) // int(o))
    __radd__, __rmul__ = __add__, __mul__


class KernelLaunchParams:
    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class SymInt32(int):
    pass


class SymIntExprs(tuple):
    @classmethod
    def from_tuple(cls, exprs):
        return cls(int(e) for e in exprs)


class AutoTuneCombination:
    def __init__(self, io_types=None, layouts=None, tactics=None):
        self.io_types = [t.strip() for t in io_types.split(",")]
        self.layouts, self.tactics = layouts, list(tactics or [])
        assert all(t > 0 for t in self.tactics), "custom tactics must be positive"


def from_shape_expr(shape, dtype):
    return TensorDesc(shape, dtype)


def _schema(fn):
    return list(inspect.signature(fn).parameters)


def register(plugin_id):
    def wrap(fn):
        sig = inspect.signature(fn)
        tensors, attrs = [], []
        for name, param in sig.parameters.items():
            if param.annotation is TensorDesc:
                assert not attrs, f"{plugin_id}: tensor {name} after an attribute"
                tensors.append(name)
            else:
                assert param.annotation in (int, float, bool, str, bytes), f"{plugin_id}: attribute {name} type"
                attrs.append(name)
        ret = sig.return_annotation
        num_outputs = len(typing.get_args(ret)) if typing.get_origin(ret) is tuple else 1
        assert ret is TensorDesc or all(a is TensorDesc for a in typing.get_args(ret)), f"{plugin_id}: return"
        REGISTRY[plugin_id] = dict(register=fn, tensors=tensors, attrs=attrs, num_outputs=num_outputs)
        return fn
    return wrap


def _check_params(plugin_id, fn, tail):
    entry = REGISTRY[plugin_id]
    names = _schema(fn)
    used_attrs = [a for a in entry["attrs"] if a in names]
    want = entry["tensors"] + used_attrs + tail
    assert names == want, f"{plugin_id}: {fn.__name__} parameters {names}, TensorRT expects {want}"


def autotune(plugin_id):
    def wrap(fn):
        _check_params(plugin_id, fn, ["outputs"])
        REGISTRY[plugin_id]["autotune"] = fn
        return fn
    return wrap


def aot_impl(plugin_id):
    def wrap(fn):
        _check_params(plugin_id, fn, ["outputs", "tactic"])
        ret = inspect.signature(fn).return_annotation
        args = typing.get_args(ret)
        assert typing.get_origin(ret) is tuple and len(args) == 4 and args[2] is KernelLaunchParams \
            and args[3] is SymIntExprs, f"{plugin_id}: aot_impl return annotation {ret}"
        REGISTRY[plugin_id]["aot_impl"] = fn
        return fn
    return wrap


def install() -> None:
    trt = types.ModuleType("tensorrt")
    for name in ("float32", "float16", "bfloat16", "int32", "int64", "bool"):
        setattr(trt, name, DataType(name))
    plugin = types.ModuleType("tensorrt.plugin")
    for name in ("TensorDesc", "KernelLaunchParams", "SymInt32", "SymIntExprs", "AutoTuneCombination",
                 "from_shape_expr", "register", "autotune", "aot_impl"):
        setattr(plugin, name, globals()[name])
    trt.plugin = plugin
    sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, plugin
