"""bench/syscalls.py: reading ``perf stat -x ,`` output into counts per system call."""

from __future__ import annotations

import collections

from bench.syscalls import Sample, parse_perf_stat

PERF_OUTPUT = """# started on Sun Dec  6 06:25:09 2026

0,,syscalls:sys_enter_rt_sigreturn,1471311671,100.00,,
80148,,syscalls:sys_enter_recvfrom,1471311671,100.00,,
80120,,syscalls:sys_enter_sendto,1471311671,100.00,,
33748,,syscalls:sys_enter_epoll_wait,1471311671,100.00,,
102,,syscalls:sys_enter_epoll_ctl,1471311671,100.00,,
<not counted>,,syscalls:sys_enter_futex,0,0.00,,
<not supported>,,syscalls:sys_enter_io_uring_enter,0,0.00,,
41200,,context-switches,1471311671,100.00,,
"""


def test_counts_by_call_name() -> None:
    counts = parse_perf_stat(PERF_OUTPUT)
    assert counts == {
        "recvfrom": 80148,
        "sendto": 80120,
        "epoll_wait": 33748,
        "epoll_ctl": 102,
        "context-switches": 41200,
    }


def test_nothing_counted() -> None:
    assert parse_perf_stat("# started on ...\n\n") == {}
    assert parse_perf_stat("<not counted>,,syscalls:sys_enter_read,0,0.00,,\n") == {}


def test_report_per_transaction() -> None:
    counts = collections.Counter(parse_perf_stat(PERF_OUTPUT))
    text = Sample("waypoint", 8, 40000, 15000.0, 11.0, counts).report()
    head, *calls = text.splitlines()
    assert "syscalls/tx  4.85" in head  # (80148 + 80120 + 33748 + 102) / 40000
    assert "context switches/tx 1.03" in head
    assert [line.split() for line in calls] == [
        ["recvfrom", "2.00"],
        ["sendto", "2.00"],
        ["epoll_wait", "0.84"],
    ]  # epoll_ctl (0.003 per transaction) is below the floor


def test_cpu_shares_by_object() -> None:
    from bench.syscalls import parse_perf_report_dso

    report = """

    95.91%  [kernel.kallsyms]
     2.09%  libc.so.6
     1.83%  _pump.cpython-311-x86_64-linux-gnu.so
     0.17%  libpython3.11.so.1.0


#
# (Tip: ...)
#
"""
    assert parse_perf_report_dso(report) == {
        "[kernel.kallsyms]": 95.91,
        "libc.so.6": 2.09,
        "_pump.cpython-311-x86_64-linux-gnu.so": 1.83,
        "libpython3.11.so.1.0": 0.17,
    }
