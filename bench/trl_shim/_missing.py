"""A placeholder for any attribute of a stand-in module: usable in annotations, raising when used."""


def placeholder(module: str, name: str) -> type:
    def fail(*args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is a stand-in of bench/trl_shim; install the real {module}")

    return type(name, (), {"__new__": fail, "__class_getitem__": classmethod(lambda cls, item: cls)})
