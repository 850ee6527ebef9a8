"""Real offline data kit: fetching, shard writing/reading, token streams."""
