// pyalexnet._staging: the data loader's row reader. Host code only, built on every platform.
//
// Contract: read_rows(fds, offsets, out, positions, row_bytes) reads, for each i, row_bytes bytes at byte
// offsets[i] of the open file fds[i] into out[positions[i]] (out: a C-contiguous uint8 array of rows of
// row_bytes). Returns -1 when every row was read whole, else the first i whose file ended before its row did
// (a shard cut short). A read error raises OSError with its errno.
//
// Why native: the loader's staging threads read ~200 KB rows one pread each; in Python every row takes the
// interpreter lock back between two reads, and threads then queue for it instead of reading side by side.
// Here the whole batch slice is read with the lock released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <unistd.h>

namespace py = pybind11;

namespace {

// Fills [dst, dst + n) from the file at `offset`; false when the file ends first. Retries short reads and EINTR.
bool pread_whole(int fd, unsigned char *dst, size_t n, int64_t offset, int &error) {
    size_t done = 0;
    while (done < n) {
        ssize_t got = ::pread(fd, dst + done, n - done, static_cast<off_t>(offset + static_cast<int64_t>(done)));
        if (got < 0) {
            if (errno == EINTR) continue;
            error = errno;
            return false;
        }
        if (got == 0) return false;  // end of file
        done += static_cast<size_t>(got);
    }
    return true;
}

int64_t read_rows(py::array_t<int64_t, py::array::c_style> fds, py::array_t<int64_t, py::array::c_style> offsets,
                  py::array out, py::array_t<int64_t, py::array::c_style> positions, int64_t row_bytes) {
    const int64_t n = fds.size();
    if (offsets.size() != n || positions.size() != n)
        throw py::value_error("read_rows: fds, offsets and positions must have the same length");
    if (!(out.flags() & py::array::c_style) || out.itemsize() != 1 || !out.writeable())
        throw py::value_error("read_rows: out must be a writable, C-contiguous uint8 array");
    if (row_bytes <= 0) throw py::value_error("read_rows: row_bytes must be positive");
    const int64_t rows = static_cast<int64_t>(out.nbytes()) / row_bytes;
    const int64_t *fd = fds.data(), *off = offsets.data(), *pos = positions.data();
    for (int64_t i = 0; i < n; ++i)
        if (pos[i] < 0 || pos[i] >= rows) throw py::index_error("read_rows: position " + std::to_string(pos[i]) +
                                                                " outside the " + std::to_string(rows) + " rows of out");
    auto *base = static_cast<unsigned char *>(out.mutable_data());
    int64_t short_row = -1;
    int error = 0;
    {
        py::gil_scoped_release unlocked;
        for (int64_t i = 0; i < n; ++i) {
            if (!pread_whole(static_cast<int>(fd[i]), base + pos[i] * row_bytes, static_cast<size_t>(row_bytes),
                             off[i], error)) {
                short_row = i;
                break;
            }
        }
    }
    if (error != 0) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        throw py::error_already_set();
    }
    return short_row;
}

}  // namespace

PYBIND11_MODULE(_staging, m) {
    m.doc() = "The data loader's row reader: preads into a batch buffer with the interpreter lock released.";
    m.def("read_rows", &read_rows, py::arg("fds"), py::arg("offsets"), py::arg("out"), py::arg("positions"),
          py::arg("row_bytes"));
}
