"""The tests' one wall-clock limit: a guard against a hung subprocess, never a speed check.

Tests assert behaviour, not timings. On a shared 2-core machine a script that takes 20 s alone
can take ten times as long (measured: the kill-and-resume test of test_faults.py took 361 s
for its three ~15 s runs while other test suites ran), so a limit near the usual time makes a
test fail at random; this one only stops a process that will never finish.
"""

HANG_SECONDS = 1200
