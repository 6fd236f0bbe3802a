"""Protocol-faithful fakes for parts that cannot run on a test machine."""
