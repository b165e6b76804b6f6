// The smallest useful C++ extension: notebook 04's custom sigmoid, forward and backward,
// as functions on CPU tensors (notebook 05 builds it with torch.utils.cpp_extension.load).
//
//   forward:  y = 1 / (1 + e^{-x})
//   backward: dL/dx = dL/dy * y * (1 - y)   (only the output y is needed)
#include <torch/extension.h>

#include <cmath>

namespace {

void check_cpu_float(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "sigmoid: ", name, " must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble,
                "sigmoid: ", name, " must be float32 or float64, got ", t.scalar_type());
}

}  // namespace

torch::Tensor sigmoid_forward(const torch::Tensor& x) {
    check_cpu_float(x, "x");
    const torch::Tensor xc = x.contiguous();  // the loop below walks memory in order
    torch::Tensor y = torch::empty_like(xc);
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sigmoid_forward", [&] {
        const scalar_t* in = xc.data_ptr<scalar_t>();
        scalar_t* out = y.data_ptr<scalar_t>();
        for (int64_t i = 0; i < xc.numel(); ++i) {
            // e^{-|x|} never overflows; for x < 0 use the equivalent e^x / (1 + e^x).
            const scalar_t e = std::exp(-std::abs(in[i]));
            out[i] = in[i] >= 0 ? 1 / (1 + e) : e / (1 + e);
        }
    });
    return y;
}

torch::Tensor sigmoid_backward(const torch::Tensor& grad_y, const torch::Tensor& y) {
    check_cpu_float(grad_y, "grad_y");
    check_cpu_float(y, "y");
    TORCH_CHECK(grad_y.sizes() == y.sizes(), "sigmoid: grad_y has shape ", grad_y.sizes(),
                " but y has ", y.sizes());
    return grad_y * y * (1 - y);  // element-wise, so tensor arithmetic is enough here
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "sigmoid as a C++ extension (notebook 05)";
    m.def("forward", &sigmoid_forward, "y = sigmoid(x)", pybind11::arg("x"));
    m.def("backward", &sigmoid_backward, "dL/dx from dL/dy and y", pybind11::arg("grad_y"),
          pybind11::arg("y"));
}
