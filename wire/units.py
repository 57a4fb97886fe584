"""Sizes as people write them, shared by the plugin's parameters and the session file."""


def parse_size(text: str) -> int:
    """'64M' -> 67108864.  Suffixes K, M, G, T (powers of 1024), optional 'iB'/'B'."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value
