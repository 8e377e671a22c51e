# make demo   set up .venv and run the demo sweep end to end on this machine
# make test   set up .venv with everything the tests need (MPI, Slurm, Horovod) and run them
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
	$(PY) -m pytest -q -ra

clean:
	rm -rf sweeps data/demo .pytest_cache
