#pragma once
// File input and output of the emulator harnesses (gemm_emu.cpp, small_emu.cpp): "key value"
// lines of meta.txt, raw little-endian arrays.
#include <cstddef>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu_io {

inline std::map<std::string, std::string> read_meta(const std::string& dir) {
  std::ifstream f(dir + "/meta.txt");
  if (!f) throw std::runtime_error("cannot read " + dir + "/meta.txt");
  std::map<std::string, std::string> meta;
  std::string key, value;
  while (f >> key >> value) meta[key] = value;
  return meta;
}

template <class U>
std::vector<U> read_bin(const std::string& path, std::size_t count) {
  std::vector<U> v(count);
  if (count == 0) return v;
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(count * sizeof(U)));
  if (std::size_t(f.gcount()) != count * sizeof(U)) throw std::runtime_error("short file " + path);
  return v;
}

template <class U>
void write_bin(const std::string& path, const U* p, std::size_t count) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(p), std::streamsize(count * sizeof(U)));
}

/// main() of a harness: `name DIR`, body(dir, meta) runs the case; errors go to stderr, exit 1.
template <class F>
int run_main(int argc, char** argv, const char* name, F&& body) {
  if (argc != 2) {
    std::cerr << "usage: " << name << " DIR\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    auto meta = read_meta(dir);
    body(dir, meta);
  } catch (const std::exception& e) {
    std::cerr << name << ": " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace emu_io
