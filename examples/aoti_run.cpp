// Runs an AOTInductor package of an int8pass model from C++, with no Python: loads int8pass's op library (which
// registers llmint8::cpu_linear with PyTorch's dispatcher), then the package, then runs it on one input.
//
//   aoti_run LIBRARY PACKAGE INPUT ROWS COLS DTYPE OUTPUT
//
// INPUT holds ROWS x COLS values, raw: float32 (DTYPE "float32", cast to bfloat16 for the model: "bfloat16") or int64
// (DTYPE "int64": token ids). The first output is written to OUTPUT as raw float32, after its shape on stdout.
// Built against libtorch (the torch wheel's headers and libraries); tests/test_deploy.py builds it with
// torch.utils.cpp_extension and checks it against Python.
#include <dlfcn.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

namespace {

at::Tensor read_input(const std::string& path, int64_t rows, int64_t cols, const std::string& dtype) {
  const bool ids = dtype == "int64";
  at::Tensor raw = at::empty({rows, cols}, ids ? at::kLong : at::kFloat);
  std::ifstream file(path, std::ios::binary);
  file.read(static_cast<char*>(raw.data_ptr()), raw.nbytes());
  if (!file) throw std::runtime_error("cannot read " + std::to_string(raw.nbytes()) + " bytes from " + path);
  if (dtype == "bfloat16") return raw.to(at::kBFloat16);
  if (ids || dtype == "float32") return raw;
  throw std::runtime_error("DTYPE must be float32, bfloat16 or int64, got " + dtype);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::cerr << "usage: aoti_run LIBRARY PACKAGE INPUT ROWS COLS DTYPE OUTPUT\n";
    return 2;
  }
  try {
    if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) throw std::runtime_error(std::string("dlopen: ") + dlerror());
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    const at::Tensor x = read_input(argv[3], std::stoll(argv[4]), std::stoll(argv[5]), argv[6]);
    std::vector<at::Tensor> outputs = loader.run({x});
    const at::Tensor y = outputs.at(0).to(at::kFloat).contiguous();
    std::cout << y.sizes() << std::endl;
    std::ofstream out(argv[7], std::ios::binary);
    out.write(static_cast<const char*>(y.data_ptr()), y.nbytes());
    return out ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "aoti_run: " << error.what() << "\n";
    return 1;
  }
}
