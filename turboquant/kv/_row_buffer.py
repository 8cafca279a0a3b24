"""Growable storage of row-aligned arrays with cheap eviction of the oldest rows.

Used by the KV cache so that appending one token costs O(1) amortised instead
of copying the whole history.
"""

import numpy as np


class RowBuffer:
    """Row-aligned arrays that grow at the end and shrink at the front.

    Parameters
    ----------
    layout : dict
        ``{name: (dtype, row_shape)}``; ``row_shape`` is a tuple (``()`` for
        one scalar per row).

    Notes
    -----
    Rows are only ever written once, into free capacity past the live rows;
    growth reallocates, and so does the first append after :meth:`drop_back`. Views returned by :meth:`views` therefore keep showing
    the rows they showed when taken, whatever is appended or dropped later.
    :meth:`views` returns the same dict until the rows change, so readers may
    cache what they derive from it by its identity.
    """

    def __init__(self, layout):
        self.layout = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in layout.items()}
        self.clear()

    def clear(self):
        """Drop every row and release the storage."""
        self._set_storage(self._allocate(0), 0)
        self._views = None
        self._tail_shown = False

    def _set_storage(self, arrays, live):
        self._arrays, self._start, self._stop = arrays, 0, live
        self._capacity = next(iter(arrays.values())).shape[0]
        self._bases = None
        self._views = None

    def _allocate(self, capacity):
        return {name: np.empty((capacity,) + shape, dtype=dtype)
                for name, (dtype, shape) in self.layout.items()}

    def __len__(self):
        return self._stop - self._start

    @property
    def capacity(self):
        return self._capacity

    def _make_room(self, count):
        """Fresh storage for ``count`` more rows when the free capacity cannot take them."""
        if self._tail_shown or self._stop + count > self._capacity:
            live = len(self)
            grown = self._allocate(max(16, 2 * (live + count)))
            for name, array in self._arrays.items():
                grown[name][:live] = array[self._start:self._stop]
            self._set_storage(grown, live)
            self._tail_shown = False

    def append(self, rows):
        """Append the row arrays ``rows`` (a dict with every name of the layout)."""
        count = next(iter(rows.values())).shape[0]
        if count == 0:
            return
        self._make_room(count)
        for name, array in self._arrays.items():
            array[self._stop:self._stop + count] = rows[name]
        self._stop += count
        self._views = None

    def append_one(self, rows, index):
        """Append one row: row ``index`` of every array of ``rows`` (a dict with every
        name of the layout, each array holding one row per index)."""
        self._make_room(1)
        stop = self._stop
        for name, array in self._arrays.items():
            array[stop] = rows[name][index]
        self._stop = stop + 1
        self._views = None

    def live(self, name):
        """The live rows of array ``name``: a view into the storage, for readers
        inside the package that neither write to it nor keep it."""
        return self._arrays[name][self._start:self._stop]

    def address(self, name):
        """Address of the first live row of array ``name`` (C-contiguous rows of
        the layout's shape), valid until the rows change."""
        if self._bases is None:
            self._bases = {key: (array.ctypes.data, array.strides[0]) for key, array in self._arrays.items()}
        base, stride = self._bases[name]
        return base + self._start * stride

    def drop_front(self, count):
        """Forget the ``count`` oldest rows (``0 <= count <= len(self)``)."""
        if count:
            self._start += count
            self._views = None

    def drop_back(self, count):
        """Forget the ``count`` newest rows (``0 <= count <= len(self)``).

        Earlier views may still show those rows, so the next append writes to
        fresh storage instead of over them.
        """
        if count:
            self._stop -= count
            self._views = None
            self._tail_shown = True

    def __deepcopy__(self, memo):
        """An independent buffer holding copies of the live rows only."""
        copy = RowBuffer.__new__(RowBuffer)
        copy.layout = self.layout
        copy._set_storage({name: array[self._start:self._stop].copy() for name, array in self._arrays.items()},
                          len(self))
        copy._views = None
        copy._tail_shown = False
        return copy

    def views(self):
        """Read-only views of the live rows, ``{name: ndarray}`` (do not modify the dict)."""
        if self._views is None:
            out = {}
            for name, array in self._arrays.items():
                view = array[self._start:self._stop]
                view.setflags(write=False)
                out[name] = view
            self._views = out
        return self._views

    @property
    def nbytes(self):
        """Bytes of the live rows (what the rows need, not the spare capacity)."""
        return sum(array[self._start:self._stop].nbytes for array in self._arrays.values())
