# make demo   set up .venv and run the demo sweep end to end on this machine
# make test   set up .venv with everything the tests need (MPI, Slurm, Horovod) and run them
#             (HPCTRAIN_REQUIRE_ALL=1: a test whose MPI, Slurm or Horovod is missing fails instead of skipping)
PY := .venv/bin/python
HPCTRAIN := .venv/bin/hpctrain

.PHONY: setup setup-test demo test clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

demo: setup
	scripts/demo.sh

test: setup-test
	HPCTRAIN_REQUIRE_ALL=1 $(PY) -m pytest -q -ra --durations=25

clean:
	rm -rf sweeps data/demo .pytest_cache
