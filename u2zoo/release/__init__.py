"""Publishing verified artifacts: release folders (bundle), their index (index), model cards (card), fetching a release file (fetch) and pushing a release (push)."""
