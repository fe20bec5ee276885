"""Reads the f32 tensors and the metadata of a GGUF file (enough for an
importance matrix); no dependency beyond the standard library."""
import struct

_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?',
            10: 'Q', 11: 'q', 12: 'd'}


def read(path):
    """Returns (metadata dict, {tensor name: list of floats}) for a GGUF
    file whose tensors are all f32."""
    data = open(path, 'rb').read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from('<' + fmt, data, pos)
        pos += struct.calcsize('<' + fmt)
        return v

    def string():
        nonlocal pos
        (n,) = take('Q')
        s = data[pos:pos + n].decode()
        pos += n
        return s

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            (et,) = take('I')
            (n,) = take('Q')
            return [value(et) for _ in range(n)]
        return take(_SCALARS[t])[0]

    magic, _version = take('4sI')
    if magic != b'GGUF':
        raise ValueError(f'{path} is not a GGUF file')
    n_tensors, n_kv = take('QQ')
    meta = {}
    for _ in range(n_kv):
        k = string()
        (t,) = take('I')
        meta[k] = value(t)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (nd,) = take('I')
        dims = take('Q' * nd)
        (ty,) = take('I')
        (off,) = take('Q')
        if ty != 0:
            raise ValueError(f'{name} is not f32')
        infos.append((name, dims, off))
    align = meta.get('general.alignment', 32)
    pos = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, off in infos:
        n = 1
        for d in dims:
            n *= d
        tensors[name] = list(struct.unpack_from('<%df' % n, data, pos + off))
    return meta, tensors
