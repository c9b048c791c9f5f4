# The two commands of the README, plus the pieces they are made of.
.PHONY: setup serve test test-image test-rust test-python lint gateway

setup:
	bash scripts/setup.sh

gateway:
	bash scripts/build_gateway.sh

serve: setup
	.venv/bin/thaw serve --snapshot .thaw/snapshots/default --port $${PORT:-8080}

test: setup
	bash scripts/test.sh

# The image alone: built from the Dockerfile by a real Docker engine and run.
test-image: setup
	bash scripts/test_image.sh
