# The two commands of the README, plus the pieces they are made of.
.PHONY: setup serve test test-rust test-python lint gateway

setup:
	bash scripts/setup.sh

gateway:
	bash scripts/build_gateway.sh

serve: setup
	.venv/bin/thaw serve --snapshot .thaw/snapshots/default --port $${PORT:-8080}

test: setup
	bash scripts/test.sh
