#!/usr/bin/env bash
# Build llama.cpp once and install llama-cpp-python over it, into ./.venv (or $LOWBIT_VENV).
# An optional extra: the export tests and benchmarks use it; lowbit itself never needs it.
#
# One compile serves both: llama-cpp-python's source distribution vendors llama.cpp, which
# is built here with cmake (shared libraries plus the tools the benchmarks run:
# llama-perplexity, llama-quantize, llama-imatrix, llama-bench) into .engines/llama.cpp,
# then the Python package is installed without its own compile (LLAMA_BUILD=OFF) and given
# those libraries. AVX2 is selected explicitly instead of -march=native: native detection
# enabled AMX/AVX-512 code that faulted (SIGILL) on one of these machines.
# LOWBIT_LLAMA_TOOLS=0 builds the library alone (what the tests use; CI does this): the
# tools and their `common` library are 40% of the objects. Running the script again
# without it adds the tools to the same build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOWBIT_VENV:-.venv}"
version="0.3.36"   # llama-cpp-python; its vendored llama.cpp is the engine version docs/exports.md names
home=".engines/llama.cpp"
pip="$venv/bin/python -m pip"
stamp="$home/configured-$version"
targets="llama"
[ "${LOWBIT_LLAMA_TOOLS:-1}" = 0 ] || targets="$targets llama-perplexity llama-quantize llama-imatrix llama-bench"
[ -f "$home/built-$version" ] && touch "$stamp"   # a build made before the tools were optional
if [ ! -f "$stamp" ]; then
    rm -rf "$home"
    mkdir -p "$home"
    $pip download -q --no-deps --no-binary :all: -d "$home" "llama-cpp-python==$version"
    tar -xzf "$home/llama_cpp_python-$version.tar.gz" -C "$home"
    src="$home/llama_cpp_python-$version"
    cmake -S "$src/vendor/llama.cpp" -B "$home/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON > "$home/configure.log"
    touch "$stamp"
fi
# shellcheck disable=SC2086  # one word per target
cmake --build "$home/build" -j "$(nproc)" --target $targets >> "$home/build.log"   # nothing to do when built
src="$home/llama_cpp_python-$version"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $pip install -q "$src"
    lib="$("$venv/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")"
    mkdir -p "$lib"
    cp -P "$home"/build/bin/lib*.so* "$lib"/
fi
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'over', '$home/build/bin')"
