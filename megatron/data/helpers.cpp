/*
 * Fast index builders for the GPT-NeoX-style data pipeline (pybind11 module).
 *
 * build_sample_idx_int32 / build_sample_idx_int64
 *     The packed-sample index: row i = (position in doc_idx, token offset in that document) where
 *     sample i starts; sample i spans tokens [row i, row i+1] inclusive, so consecutive samples
 *     share one token (input/label shift). Produces exactly the arrays GPT-NeoX's helpers produce.
 * build_blending_indices
 *     Greedy deterministic interleaving of several datasets that follows the weights: each step
 *     picks the dataset whose achieved count lags its target the most (ties: lowest index).
 *
 * megatron/data/helpers.py holds the numpy twins of both functions and the just-in-time build.
 */

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

template <typename IndexT>
py::array build_sample_idx(const py::array_t<int32_t, py::array::c_style>& sizes_,
                           const py::array_t<int32_t, py::array::c_style>& doc_idx_,
                           const int32_t seq_length,
                           const int32_t num_epochs,
                           const int64_t tokens_per_epoch)
{
    if (seq_length < 1) { throw std::invalid_argument("build_sample_idx: seq_length must be >= 1"); }
    if (num_epochs < 1) { throw std::invalid_argument("build_sample_idx: num_epochs must be >= 1"); }
    if (tokens_per_epoch < 1) {
        throw std::invalid_argument("build_sample_idx: tokens_per_epoch must be >= 1");
    }
    if (sizes_.ndim() != 1 || doc_idx_.ndim() != 1) {
        throw std::invalid_argument("build_sample_idx: sizes and doc_idx must be 1-D arrays");
    }

    const int32_t* sizes = sizes_.data();
    const int32_t* doc_idx = doc_idx_.data();
    const int64_t num_sizes = sizes_.shape(0);
    const int64_t num_doc_idx = doc_idx_.shape(0);

    // The last sample ends on token num_samples * seq_length, which must exist; the -1 is the token
    // shared between consecutive samples.
    const int64_t num_samples = (static_cast<int64_t>(num_epochs) * tokens_per_epoch - 1) / seq_length;
    std::vector<IndexT>* out = new std::vector<IndexT>(2 * (num_samples + 1));
    IndexT* sample_idx = out->data();

    std::string error;
    {
        // Pure arithmetic on raw buffers: let other Python threads run meanwhile.
        py::gil_scoped_release release;

        int64_t doc_idx_index = 0;
        int64_t doc_offset = 0;
        sample_idx[0] = 0;
        sample_idx[1] = 0;
        for (int64_t sample_index = 1; sample_index <= num_samples && error.empty(); ++sample_index) {
            int64_t remaining = static_cast<int64_t>(seq_length) + 1;
            while (remaining != 0) {
                if (doc_idx_index >= num_doc_idx) {
                    std::ostringstream msg;
                    msg << "build_sample_idx: ran past the end of doc_idx (" << num_doc_idx
                        << " entries) at sample " << sample_index
                        << "; tokens_per_epoch does not match sizes[doc_idx]";
                    error = msg.str();
                    break;
                }
                const int64_t doc_id = doc_idx[doc_idx_index];
                if (doc_id < 0 || doc_id >= num_sizes) {
                    std::ostringstream msg;
                    msg << "build_sample_idx: doc_idx[" << doc_idx_index << "] = " << doc_id
                        << " is outside sizes (" << num_sizes << " documents)";
                    error = msg.str();
                    break;
                }
                const int64_t doc_length = static_cast<int64_t>(sizes[doc_id]) - doc_offset;
                remaining -= doc_length;
                if (remaining <= 0) {
                    // The sample ends inside this document; the next one starts on its last token.
                    doc_offset += remaining + doc_length - 1;
                    remaining = 0;
                } else {
                    ++doc_idx_index;
                    doc_offset = 0;
                }
            }
            sample_idx[2 * sample_index] = static_cast<IndexT>(doc_idx_index);
            sample_idx[2 * sample_index + 1] = static_cast<IndexT>(doc_offset);
        }
    }
    if (!error.empty()) {
        delete out;
        throw std::invalid_argument(error);
    }

    py::capsule owner(out, [](void* p) { delete reinterpret_cast<std::vector<IndexT>*>(p); });
    const auto item = static_cast<py::ssize_t>(sizeof(IndexT));
    return py::array_t<IndexT>({static_cast<py::ssize_t>(num_samples + 1), py::ssize_t{2}},
                               {2 * item, item}, sample_idx, owner);
}

void build_blending_indices(py::array_t<uint8_t, py::array::c_style>& dataset_index,
                            py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                            const py::array_t<double, py::array::c_style>& weights,
                            const int32_t num_datasets,
                            const int64_t size)
{
    if (num_datasets < 1 || num_datasets > 255) {
        throw std::invalid_argument("build_blending_indices: num_datasets must be in [1, 255]");
    }
    if (weights.ndim() != 1 || weights.shape(0) != num_datasets) {
        throw std::invalid_argument("build_blending_indices: weights must have num_datasets entries");
    }
    if (dataset_index.shape(0) < size || dataset_sample_index.shape(0) < size) {
        throw std::invalid_argument("build_blending_indices: output arrays are shorter than size");
    }
    uint8_t* out_dataset = dataset_index.mutable_data();
    int64_t* out_sample = dataset_sample_index.mutable_data();
    const double* w = weights.data();

    py::gil_scoped_release release;
    std::vector<int64_t> current(num_datasets, 0);
    for (int64_t sample = 0; sample < size; ++sample) {
        // Target count after `sample` draws is weight * sample (at least 1 so step 0 follows the
        // largest weight); pick the dataset furthest below its target, first one on ties.
        const double scale = std::max(static_cast<double>(sample), 1.0);
        int64_t best = 0;
        double best_error = w[0] * scale - static_cast<double>(current[0]);
        for (int64_t d = 1; d < num_datasets; ++d) {
            const double err = w[d] * scale - static_cast<double>(current[d]);
            if (err > best_error) {
                best_error = err;
                best = d;
            }
        }
        out_dataset[sample] = static_cast<uint8_t>(best);
        out_sample[sample] = current[best];
        current[best] += 1;
    }
}

}  // namespace

PYBIND11_MODULE(megatron_data_helpers, m)
{
    m.doc() = "C++ index builders for megatron.data (see megatron/data/helpers.py)";
    m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"));
    m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("doc_idx"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"));
    m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
          py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"),
          py::arg("size"));
}
