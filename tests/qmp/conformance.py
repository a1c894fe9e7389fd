#!/usr/bin/env python3
"""Conformance: the SAME scripted QMP session against qemu-storage-daemon
10.0.2 and against `baton daemon`, both started with the same command line
(`--chardev socket,path=S,server=on,wait=off,id=m --monitor chardev=m`),
compared reply by reply:

* same kind (return / error) and, for errors, the same class (desc texts are
  compared too and listed, but an allowlist entry covers them);
* for returns, the same JSON types and, for objects, the same key sets,
  recursively (lists: element by element up to the shorter length, and the
  lengths); baton may have extra keys only where the allowlist says so;
* the same events (names and data key sets) in the same order;
* semantic digests where the values matter: query-named-block-nodes (node
  order, driver, active, read-only, size, bitmaps and their order/state),
  query-block-exports, the greeting's QEMU version, bitmap sha256 after the
  same NBD writes;
* query-commands: baton's commands are a subset of QSD's (x-baton-* aside);
* query-qmp-schema: both are lists of {name, meta-type, ...}; every baton
  command and event is in QSD's with the same meta-type, argument names and
  optionality (flat-union variants included) and return meta-type.

Differences listed in allowlist.json ("conformance") with a reason are
reported but allowed; anything else fails. Prints the commands covered, a
table of every difference, and which were allowed.

Env: BATON = path of the baton binary. Exit status 0 = pass.
"""

import fnmatch
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BATON = os.environ.get("BATON")
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10
MIB = 1 << 20


# ---------------------------------------------------------------- scenario

def S(label, cmd, args=None, *, compare=True, async_events=False, digest=None, special=None, exact_desc=False,
      expect=None):
    """A QMP step. compare=False: a cleanup step whose reply and events are
    not compared (used after a known divergence so that it does not
    cascade). async_events: the events this step causes may arrive after
    its reply; they are compared together with the next @wait step.
    exact_desc: the desc tells which check fired first, so a different desc
    is reported as "desc-exact" (the allowlist's general "desc" entry does
    not cover it).
    expect: reply -> problem text or None, checked on both daemons (a
    problem on QSD means the scenario, not baton, is wrong)."""
    return dict(op="qmp", label=label, cmd=cmd, args=args, compare=compare, async_events=async_events,
                digest=digest, special=special, exact_desc=exact_desc, expect=expect)


def OP(op, label, **kw):
    return dict(op=op, label=label, compare=True, **kw)


IMG = "{D}/img.raw"
IMG2 = "{D}/img2.raw"
IMG3 = "{D}/img3.raw"
NBD = "{D}/nbd.sock"


def bm(node, name, **kw):
    return dict(node=node, name=name, **kw)


def tx(*actions, **props):
    a = {"actions": [{"type": t, "data": d} for t, d in actions]}
    if props:
        a["properties"] = props
    return a


def bitmaps_are(want):
    """expect: {node: {bitmap: recording}} exactly (nodes not named have no bitmaps)."""
    def check(reply):
        got = {n["node-name"]: {b["name"]: b["recording"] for b in n.get("dirty-bitmaps", [])}
               for n in reply.get("return", [])}
        got = {k: v for k, v in got.items() if v}
        return None if got == want else f"bitmaps {got}, expected {want}"
    return check


SCENARIO = [
    S("qmp_capabilities", "qmp_capabilities"),
    S("query-version", "query-version", digest="version"),
    S("query-commands", "query-commands", special="commands"),
    S("query-qmp-schema", "query-qmp-schema", special="schema"),

    # blockdev-add: success
    S("add file f", "blockdev-add", {"driver": "file", "node-name": "f", "filename": IMG}),
    S("add raw r over f", "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
    S("add null-co n", "blockdev-add", {"driver": "null-co", "node-name": "n", "size": MIB}),
    S("add blkdebug d over n", "blockdev-add", {"driver": "blkdebug", "node-name": "d", "image": "n"}),
    S("add file f2 inactive", "blockdev-add", {"driver": "file", "node-name": "f2", "filename": IMG2, "active": False}),
    S("add raw r9 inactive over active f", "blockdev-add",
      {"driver": "raw", "node-name": "r9", "file": "f", "active": False}),
    S("query-named-block-nodes (all drivers)", "query-named-block-nodes", digest="nodes"),
    S("query-named-block-nodes flat", "query-named-block-nodes", {"flat": True}, digest="nodes"),
    S("del r9", "blockdev-del", {"node-name": "r9"}),
    # blockdev-add: errors
    S("add active raw over inactive f2", "blockdev-add", {"driver": "raw", "node-name": "r3", "file": "f2"}),
    S("cleanup r3 (if it was added)", "blockdev-del", {"node-name": "r3"}, compare=False),
    S("add duplicate node-name f", "blockdev-add", {"driver": "file", "node-name": "f", "filename": IMG2}),
    S("add without node-name", "blockdev-add", {"driver": "file", "filename": IMG2}),
    S("add unknown driver", "blockdev-add", {"driver": "nosuch", "node-name": "x"}),
    S("add unknown option", "blockdev-add", {"driver": "file", "node-name": "x", "filename": IMG2, "bogus": 1}),
    S("add raw missing file", "blockdev-add", {"driver": "raw", "node-name": "x"}),
    S("add file missing filename", "blockdev-add", {"driver": "file", "node-name": "x"}),
    S("add file nonexistent", "blockdev-add", {"driver": "file", "node-name": "x", "filename": "{D}/nonexistent.raw"}),
    S("add raw unknown child", "blockdev-add", {"driver": "raw", "node-name": "x", "file": "nosuch"}),
    S("add invalid node-name", "blockdev-add", {"driver": "file", "node-name": "9bad", "filename": IMG2}),
    S("add null-co bad size type", "blockdev-add", {"driver": "null-co", "node-name": "x", "size": "big"}),
    # blockdev-del
    S("del f (in use by r)", "blockdev-del", {"node-name": "f"}),
    S("del unknown", "blockdev-del", {"node-name": "nosuch"}),
    S("del n (in use by d)", "blockdev-del", {"node-name": "n"}),
    S("del d", "blockdev-del", {"node-name": "d"}),
    S("del n", "blockdev-del", {"node-name": "n"}),
    S("del f2", "blockdev-del", {"node-name": "f2"}),
    S("query-named-block-nodes (f, r)", "query-named-block-nodes", digest="nodes"),

    # dirty bitmaps
    S("bitmap add r/b0", "block-dirty-bitmap-add", bm("r", "b0")),
    S("bitmap add r/b0 again", "block-dirty-bitmap-add", bm("r", "b0")),
    S("bitmap add granularity 1000", "block-dirty-bitmap-add", bm("r", "b1", granularity=1000)),
    S("bitmap add duplicate + bad granularity", "block-dirty-bitmap-add", bm("r", "b0", granularity=1000),
      exact_desc=True),
    S("bitmap add unknown node", "block-dirty-bitmap-add", bm("nosuch", "b1")),
    S("bitmap add empty name", "block-dirty-bitmap-add", bm("r", "")),
    S("bitmap add r/b1 4k disabled", "block-dirty-bitmap-add", bm("r", "b1", granularity=4096, disabled=True)),
    S("bitmap add f/b0 (names are per node)", "block-dirty-bitmap-add", bm("f", "b0", granularity=512)),
    S("bitmap remove unknown", "block-dirty-bitmap-remove", bm("r", "nosuch")),
    S("bitmap remove unknown node", "block-dirty-bitmap-remove", bm("nosuch", "b0")),
    S("bitmap clear unknown", "block-dirty-bitmap-clear", bm("r", "nosuch")),
    S("bitmap enable unknown", "block-dirty-bitmap-enable", bm("r", "nosuch")),
    S("bitmap disable unknown", "block-dirty-bitmap-disable", bm("r", "nosuch")),
    S("bitmap clear unknown node", "block-dirty-bitmap-clear", bm("nosuch", "b0")),
    S("bitmap enable r/b1", "block-dirty-bitmap-enable", bm("r", "b1")),
    S("bitmap disable r/b1", "block-dirty-bitmap-disable", bm("r", "b1")),
    S("bitmap disable r/b1 again", "block-dirty-bitmap-disable", bm("r", "b1")),
    S("bitmap clear r/b0", "block-dirty-bitmap-clear", bm("r", "b0")),
    S("bitmap merge b1 into b0 (name)", "block-dirty-bitmap-merge", {"node": "r", "target": "b0", "bitmaps": ["b1"]}),
    S("bitmap merge b1 into b0 (object)", "block-dirty-bitmap-merge",
      {"node": "r", "target": "b0", "bitmaps": [{"node": "r", "name": "b1"}]}),
    S("bitmap merge unknown source", "block-dirty-bitmap-merge", {"node": "r", "target": "b0", "bitmaps": ["nosuch"]}),
    S("bitmap merge unknown target", "block-dirty-bitmap-merge", {"node": "r", "target": "nosuch", "bitmaps": ["b1"]}),
    S("sha256 r/b0", "x-debug-block-dirty-bitmap-sha256", bm("r", "b0"), digest="sha256"),
    S("sha256 unknown", "x-debug-block-dirty-bitmap-sha256", bm("r", "nosuch")),
    S("query-named-block-nodes (bitmaps)", "query-named-block-nodes", digest="nodes"),

    # transaction
    S("transaction ok (add t1, clear b0, enable b1)", "transaction",
      tx(("block-dirty-bitmap-add", bm("r", "t1")), ("block-dirty-bitmap-clear", bm("r", "b0")),
         ("block-dirty-bitmap-enable", bm("r", "b1")))),
    S("query-named-block-nodes (after transaction)", "query-named-block-nodes", digest="nodes",
      expect=bitmaps_are({"r": {"b0": True, "b1": True, "t1": True}, "f": {"b0": True}})),
    S("transaction fails at bad granularity (rolls back)", "transaction",
      tx(("block-dirty-bitmap-add", bm("r", "t2")), ("block-dirty-bitmap-disable", bm("r", "b1")),
         ("block-dirty-bitmap-remove", bm("r", "t1")), ("block-dirty-bitmap-add", bm("f", "t3")),
         ("block-dirty-bitmap-add", bm("r", "t4", granularity=1000)))),
    S("query-named-block-nodes (nothing left by the rollback)", "query-named-block-nodes", digest="nodes",
      expect=bitmaps_are({"r": {"b0": True, "b1": True, "t1": True}, "f": {"b0": True}})),
    S("transaction fails at unknown node (rolls back)", "transaction",
      tx(("block-dirty-bitmap-merge", {"node": "r", "target": "t1", "bitmaps": ["b1"]}),
         ("block-dirty-bitmap-add", bm("r", "t5")), ("block-dirty-bitmap-add", bm("nosuch", "t6")))),
    S("transaction fails at unknown bitmap", "transaction",
      tx(("block-dirty-bitmap-add", bm("r", "t7")), ("block-dirty-bitmap-clear", bm("r", "nosuch")))),
    S("query-named-block-nodes (still nothing left)", "query-named-block-nodes", digest="nodes",
      expect=bitmaps_are({"r": {"b0": True, "b1": True, "t1": True}, "f": {"b0": True}})),
    S("transaction empty", "transaction", {"actions": []}),
    S("bitmap remove r/t1", "block-dirty-bitmap-remove", bm("r", "t1")),
    S("bitmap remove f/b0", "block-dirty-bitmap-remove", bm("f", "b0")),

    # NBD server and exports
    S("export add without nbd server", "block-export-add", {"type": "nbd", "id": "e0", "node-name": "r"}),
    S("nbd-server-stop when not running", "nbd-server-stop"),
    S("nbd-server-start", "nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
    S("nbd-server-start twice", "nbd-server-start", {"addr": {"type": "unix", "data": {"path": "{D}/nbd2.sock"}}}),
    S("query-block-exports (none)", "query-block-exports", digest="exports"),
    S("export add unknown node", "block-export-add", {"type": "nbd", "id": "ex", "node-name": "nosuch"}),
    S("export add unknown bitmap", "block-export-add",
      {"type": "nbd", "id": "ex", "node-name": "r", "bitmaps": ["nosuch"]}),
    S("export add e1 writable with bitmaps [b0]", "block-export-add",
      {"type": "nbd", "id": "e1", "node-name": "r", "writable": True, "bitmaps": ["b0"]}),
    S("export add duplicate id", "block-export-add", {"type": "nbd", "id": "e1", "node-name": "r", "name": "other"}),
    S("export add duplicate name", "block-export-add", {"type": "nbd", "id": "e9", "node-name": "r"}),
    S("export add read-only with enabled bitmap", "block-export-add",
      {"type": "nbd", "id": "e2", "node-name": "r", "name": "ro", "bitmaps": ["b0"]}),
    S("cleanup e2 (if it was added)", "block-export-del", {"id": "e2"}, compare=False),
    S("bitmap disable r/b1", "block-dirty-bitmap-disable", bm("r", "b1")),
    S("export add e3 read-only with disabled bitmap", "block-export-add",
      {"type": "nbd", "id": "e3", "node-name": "r", "name": "ro3", "bitmaps": ["b1"]}),
    S("query-block-exports (e3, e1)", "query-block-exports", digest="exports"),
    OP("qemu-io", "write through e1", export="r", cmds=["write -P 0x5a 0 512", "write -P 0x5a 1M 64k"]),
    S("sha256 r/b0 after writes", "x-debug-block-dirty-bitmap-sha256", bm("r", "b0"), digest="sha256"),
    S("query-named-block-nodes (dirty counts)", "query-named-block-nodes", digest="nodes"),
    # exported bitmaps are busy in QEMU: no clear/enable/disable/merge-into/remove
    S("bitmap clear exported b1 (busy)", "block-dirty-bitmap-clear", bm("r", "b1")),
    S("bitmap enable exported b1 (busy)", "block-dirty-bitmap-enable", bm("r", "b1")),
    S("cleanup: disable b1 again", "block-dirty-bitmap-disable", bm("r", "b1"), compare=False),
    S("bitmap disable exported b0 (busy)", "block-dirty-bitmap-disable", bm("r", "b0")),
    S("cleanup: enable b0 again", "block-dirty-bitmap-enable", bm("r", "b0"), compare=False),
    S("bitmap merge empty b1 into exported b0 (busy)", "block-dirty-bitmap-merge",
      {"node": "r", "target": "b0", "bitmaps": ["b1"]}),
    S("bitmap remove exported b1 (busy)", "block-dirty-bitmap-remove", bm("r", "b1")),
    S("cleanup: re-add b1 (if it was removed)", "block-dirty-bitmap-add", bm("r", "b1", granularity=4096, disabled=True),
      compare=False),

    # blockdev-set-active
    S("set-active f false (active parent)", "blockdev-set-active", {"node-name": "f", "active": False}),
    S("set-active r false (exported)", "blockdev-set-active", {"node-name": "r", "active": False}),
    S("set-active all false (exported)", "blockdev-set-active", {"active": False}),
    S("set-active unknown node", "blockdev-set-active", {"node-name": "nosuch", "active": False}),
    S("query-named-block-nodes (still active)", "query-named-block-nodes", digest="nodes"),
    S("del r while exported", "blockdev-del", {"node-name": "r"}),
    S("export del unknown", "block-export-del", {"id": "nosuch"}),
    S("export del e1 safe", "block-export-del", {"id": "e1", "mode": "safe"}),
    S("export del e3 hard", "block-export-del", {"id": "e3", "mode": "hard"}),
    S("query-block-exports (empty)", "query-block-exports", digest="exports"),
    S("set-active r false", "blockdev-set-active", {"node-name": "r", "active": False}),
    S("set-active r false twice", "blockdev-set-active", {"node-name": "r", "active": False}),
    S("query-named-block-nodes (inactive)", "query-named-block-nodes", digest="nodes"),
    S("bitmap add on inactive node", "block-dirty-bitmap-add", bm("r", "b9")),
    S("export add e4 allow-inactive on inactive node", "block-export-add",
      {"type": "nbd", "id": "e4", "node-name": "r", "writable": True, "allow-inactive": True}),
    S("query-named-block-nodes (still inactive)", "query-named-block-nodes", digest="nodes"),
    OP("qemu-io", "write to inactive export fails", export="r", cmds=["write 0 512"]),
    S("set-active f true (child only)", "blockdev-set-active", {"node-name": "f", "active": True}),
    S("query-named-block-nodes (f active, r inactive)", "query-named-block-nodes", digest="nodes"),
    S("set-active r false (r already inactive, f stays)", "blockdev-set-active", {"node-name": "r", "active": False}),
    S("query-named-block-nodes (f still active)", "query-named-block-nodes", digest="nodes"),
    S("set-active all true", "blockdev-set-active", {"active": True}),
    S("set-active all true twice", "blockdev-set-active", {"active": True}),
    S("set-active all false (allow-inactive export)", "blockdev-set-active", {"active": False}),
    S("set-active all false twice", "blockdev-set-active", {"active": False}),
    S("query-named-block-nodes (all inactive)", "query-named-block-nodes", digest="nodes"),
    S("export add e5 on inactive f (activates f only)", "block-export-add",
      {"type": "nbd", "id": "e5", "node-name": "f", "writable": True}),
    S("query-named-block-nodes (f active again)", "query-named-block-nodes", digest="nodes"),
    S("set-active r true", "blockdev-set-active", {"node-name": "r", "active": True}),
    S("query-block-exports (e5, e4)", "query-block-exports", digest="exports"),
    S("export del e4", "block-export-del", {"id": "e4"}),
    OP("client-start", "NBD client connects to e5", export="f"),
    S("export del e5 safe with a client", "block-export-del", {"id": "e5"}),
    S("export del e5 hard with a client", "block-export-del", {"id": "e5", "mode": "hard"}, async_events=True),
    OP("wait-event", "BLOCK_EXPORT_DELETED e5 arrives", event="BLOCK_EXPORT_DELETED"),
    OP("client-stop", "NBD client goes away"),
    S("query-block-exports (empty again)", "query-block-exports", digest="exports"),
    S("export add e6", "block-export-add", {"type": "nbd", "id": "e6", "node-name": "r"}),
    S("nbd-server-stop (deletes e6)", "nbd-server-stop"),
    S("nbd-server-stop twice", "nbd-server-stop"),
    S("query-block-exports (after stop)", "query-block-exports", digest="exports"),
    S("nbd-server-start again", "nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}),
    S("nbd-server-stop (no exports)", "nbd-server-stop"),

    # block jobs: blockdev-mirror and the job-* / block-job-* commands
    S("add mirror target file tf", "blockdev-add", {"driver": "file", "node-name": "tf", "filename": IMG3}),
    S("add mirror target raw t", "blockdev-add", {"driver": "raw", "node-name": "t", "file": "tf"}),
    S("query-jobs (none)", "query-jobs", digest="jobs"),
    S("query-block-jobs (none)", "query-block-jobs", digest="block-jobs"),
    S("mirror unknown device", "blockdev-mirror", {"job-id": "m", "device": "nosuch", "target": "t", "sync": "full"}),
    S("mirror unknown target", "blockdev-mirror", {"job-id": "m", "device": "r", "target": "nosuch", "sync": "full"}),
    S("mirror bad sync", "blockdev-mirror", {"job-id": "m", "device": "r", "target": "t", "sync": "bogus"}),
    S("mirror missing sync", "blockdev-mirror", {"job-id": "m", "device": "r", "target": "t"}),
    S("mirror onto itself", "blockdev-mirror", {"job-id": "m", "device": "r", "target": "r", "sync": "full"}),
    S("job-pause unknown", "job-pause", {"id": "nosuch"}),
    S("job-complete unknown", "job-complete", {"id": "nosuch"}),
    S("block-job-set-speed unknown", "block-job-set-speed", {"device": "nosuch", "speed": 0}),
    S("block-job-cancel unknown", "block-job-cancel", {"device": "nosuch"}),
    S("block-job-pause unknown", "block-job-pause", {"device": "nosuch"}),
    S("block-job-complete unknown", "block-job-complete", {"device": "nosuch"}),
    S("block-job-finalize unknown", "block-job-finalize", {"id": "nosuch"}),
    S("job-cancel unknown", "job-cancel", {"id": "nosuch"}),
    S("job-dismiss unknown", "job-dismiss", {"id": "nosuch"}),
    S("mirror r -> t (manual finalize/dismiss)", "blockdev-mirror",
      {"job-id": "m", "device": "r", "target": "t", "sync": "full", "auto-finalize": False, "auto-dismiss": False},
      async_events=True),
    OP("wait-event", "mirror m gets ready", event="BLOCK_JOB_READY", data={"device": "m"}),
    S("mirror with a duplicate job-id", "blockdev-mirror", {"job-id": "m", "device": "r", "target": "t", "sync": "full"}),
    S("query-jobs (m ready)", "query-jobs", digest="jobs"),
    S("query-block-jobs (m ready)", "query-block-jobs", digest="block-jobs"),
    S("block-job-set-speed m", "block-job-set-speed", {"device": "m", "speed": 1048576}),
    S("job-pause m", "job-pause", {"id": "m"}, async_events=True),
    OP("wait-event", "m goes to standby", event="JOB_STATUS_CHANGE", data={"id": "m", "status": "standby"}),
    S("query-jobs (m standby)", "query-jobs", digest="jobs"),
    S("job-resume m", "job-resume", {"id": "m"}, async_events=True),
    OP("wait-event", "m is ready again", event="JOB_STATUS_CHANGE", data={"id": "m", "status": "ready"}),
    S("block-job-change m copy-mode", "block-job-change", {"id": "m", "type": "mirror", "copy-mode": "write-blocking"}),
    S("job-finalize m before it is pending", "job-finalize", {"id": "m"}),
    S("job-dismiss m before it is concluded", "job-dismiss", {"id": "m"}),
    S("job-complete m", "job-complete", {"id": "m"}, async_events=True),
    OP("wait-event", "m becomes pending", event="BLOCK_JOB_PENDING", data={"id": "m"}),
    S("query-jobs (m pending)", "query-jobs", digest="jobs"),
    S("job-finalize m", "job-finalize", {"id": "m"}, async_events=True),
    OP("wait-event", "m concludes", event="JOB_STATUS_CHANGE", data={"id": "m", "status": "concluded"}),
    S("query-jobs (m concluded)", "query-jobs", digest="jobs"),
    S("job-dismiss m", "job-dismiss", {"id": "m"}),
    S("query-jobs (empty again)", "query-jobs", digest="jobs"),
    S("mirror r -> t again (defaults)", "blockdev-mirror", {"job-id": "m2", "device": "r", "target": "t", "sync": "full"},
      async_events=True),
    OP("wait-event", "mirror m2 gets ready", event="BLOCK_JOB_READY", data={"device": "m2"}),
    S("block-job-cancel m2 (ready: completes without pivot)", "block-job-cancel", {"device": "m2"}, async_events=True),
    OP("wait-event", "m2 goes away", event="JOB_STATUS_CHANGE", data={"id": "m2", "status": "null"}),
    S("mirror r -> t (m3, manual finalize/dismiss, block-job-* commands)", "blockdev-mirror",
      {"job-id": "m3", "device": "r", "target": "t", "sync": "full", "auto-finalize": False, "auto-dismiss": False},
      async_events=True),
    OP("wait-event", "mirror m3 gets ready", event="BLOCK_JOB_READY", data={"device": "m3"}),
    S("block-job-pause m3", "block-job-pause", {"device": "m3"}, async_events=True),
    OP("wait-event", "m3 goes to standby", event="JOB_STATUS_CHANGE", data={"id": "m3", "status": "standby"}),
    S("query-block-jobs (m3 paused)", "query-block-jobs", digest="block-jobs"),
    S("block-job-resume m3", "block-job-resume", {"device": "m3"}, async_events=True),
    OP("wait-event", "m3 is ready again", event="JOB_STATUS_CHANGE", data={"id": "m3", "status": "ready"}),
    S("block-job-complete m3", "block-job-complete", {"device": "m3"}, async_events=True),
    OP("wait-event", "m3 becomes pending", event="BLOCK_JOB_PENDING", data={"id": "m3"}),
    S("block-job-finalize m3", "block-job-finalize", {"id": "m3"}, async_events=True),
    OP("wait-event", "m3 concludes", event="JOB_STATUS_CHANGE", data={"id": "m3", "status": "concluded"}),
    S("block-job-dismiss m3", "block-job-dismiss", {"id": "m3"}),
    S("mirror r -> t (m4) then job-cancel", "blockdev-mirror",
      {"job-id": "m4", "device": "r", "target": "t", "sync": "full"}, async_events=True),
    OP("wait-event", "mirror m4 gets ready", event="BLOCK_JOB_READY", data={"device": "m4"}),
    S("job-cancel m4", "job-cancel", {"id": "m4"}, async_events=True),
    OP("wait-event", "m4 goes away", event="JOB_STATUS_CHANGE", data={"id": "m4", "status": "null"}),
    S("mirror r -> t (m5) then block-job-cancel force", "blockdev-mirror",
      {"job-id": "m5", "device": "r", "target": "t", "sync": "full"}, async_events=True),
    OP("wait-event", "mirror m5 gets ready", event="BLOCK_JOB_READY", data={"device": "m5"}),
    S("block-job-cancel m5 force", "block-job-cancel", {"device": "m5", "force": True}, async_events=True),
    OP("wait-event", "m5 goes away", event="JOB_STATUS_CHANGE", data={"id": "m5", "status": "null"}),
    S("query-block-jobs (empty again)", "query-block-jobs", digest="block-jobs"),
    S("del t", "blockdev-del", {"node-name": "t"}),
    S("del tf", "blockdev-del", {"node-name": "tf"}),

    S("del r", "blockdev-del", {"node-name": "r"}),
    S("del f", "blockdev-del", {"node-name": "f"}),
    S("query-named-block-nodes (empty)", "query-named-block-nodes", digest="nodes"),
    S("quit", "quit"),
    OP("exit", "the daemon exits"),
]


# ---------------------------------------------------------------- running

def subst(v, d):
    if isinstance(v, str):
        return v.replace("{D}", d)
    if isinstance(v, list):
        return [subst(x, d) for x in v]
    if isinstance(v, dict):
        return {k: subst(x, d) for k, x in v.items()}
    return v


class Daemon:
    def __init__(self, tag, argv0, tmp):
        self.tag = tag
        self.dir = os.path.join(tmp, tag)
        os.makedirs(self.dir)
        for name in ("img.raw", "img2.raw", "img3.raw"):
            with open(os.path.join(self.dir, name), "wb") as f:
                f.truncate(64 * MIB)
        self.qmp = os.path.join(self.dir, "qmp.sock")
        self.logpath = os.path.join(self.dir, "daemon.log")
        self.log = open(self.logpath, "wb")
        self.argv = argv0 + ["--chardev", f"socket,path={self.qmp},server=on,wait=off,id=m", "--monitor", "chardev=m"]
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.qmp):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: {' '.join(self.argv)} did not create {self.qmp} (rc={self.proc.poll()})")
            time.sleep(0.02)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(self.qmp)
        self.buf = b""
        self.pending_events = []
        self.client = None

    def line(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.tag}: no message within {timeout}s")
            r, _, _ = select.select([self.s], [], [], left)
            if r:
                chunk = self.s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"{self.tag}: QMP connection closed")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, args):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        events = self.pending_events
        self.pending_events = []
        while True:
            m = self.line()
            if "event" in m:
                events.append(m)
            else:
                return m, events

    def wait_event(self, name, data=None, timeout=30):
        # Generous: on a loaded 2-core machine a mirror can take seconds to get ready.
        events = self.pending_events
        self.pending_events = []
        deadline = time.monotonic() + timeout

        def match(e):
            return e.get("event") == name and all((e.get("data") or {}).get(k) == v for k, v in (data or {}).items())

        while not any(match(e) for e in events):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                m = self.line(left)
            except TimeoutError:
                break
            events.append(m)
        # a short grace period so that events of the same transition that
        # follow the awaited one are attributed to this step too
        while True:
            try:
                events.append(self.line(0.1))
            except TimeoutError:
                break
        return events

    def nbd_uri(self, export):
        return f"nbd+unix:///{export}?socket={os.path.join(self.dir, 'nbd.sock')}"

    def close(self):
        if self.client and self.client.poll() is None:
            self.client.kill()
            self.client.wait()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        try:
            self.s.close()
        except OSError:
            pass


def run_scenario(d):
    """Run every step; returns a list of results aligned with SCENARIO."""
    out = []
    greeting = d.line()
    out_greeting = greeting
    for st in SCENARIO:
        r = {"label": st["label"], "reply": None, "events": [], "note": None}
        op = st["op"]
        try:
            if op == "qmp":
                reply, events = d.execute(st["cmd"], subst(st["args"], d.dir))
                r["reply"] = reply
                if st["async_events"]:
                    d.pending_events = events  # carried to the next wait-event step
                else:
                    r["events"] = events
            elif op == "wait-event":
                r["events"] = d.wait_event(st["event"], st.get("data"))
            elif op == "qemu-io":
                cmd = ["qemu-io", "-f", "raw"]
                for c in st["cmds"]:
                    cmd += ["-c", c]
                p = subprocess.run(cmd + [d.nbd_uri(st["export"])], capture_output=True, text=True, timeout=TIMEOUT)
                outp = (p.stdout + p.stderr)
                # drop the timing lines ("512 bytes, 1 ops; 00.00 sec (...)")
                r["note"] = {"rc": p.returncode, "out": [x for x in outp.strip().splitlines() if " ops; " not in x][:4]}
            elif op == "client-start":
                d.client = subprocess.Popen(["qemu-io", "-f", "raw", d.nbd_uri(st["export"])], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                d.client.stdin.write(b"read 0 512\n")
                d.client.stdin.flush()
                first = d.client.stdout.readline().decode(errors="replace").strip()
                r["note"] = {"connected": "read 512/512" in first}
            elif op == "client-stop":
                if d.client:
                    try:
                        d.client.stdin.close()
                    except OSError:
                        pass
                    try:
                        d.client.wait(TIMEOUT)
                    except subprocess.TimeoutExpired:
                        d.client.kill()
                        d.client.wait()
                    d.client = None
                r["note"] = {}
            elif op == "exit":
                try:
                    rc = d.proc.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    rc = "still running"
                r["note"] = {"rc": rc, "qmp socket removed": not os.path.exists(d.qmp)}
        except Exception as e:  # noqa: BLE001
            r["reply"] = {"__exception__": f"{type(e).__name__}: {e}"}
            out.append(r)
            # Without a working monitor nothing after this can be compared.
            for rest in SCENARIO[len(out):]:
                out.append({"label": rest["label"], "reply": {"__exception__": "not run"}, "events": [], "note": None})
            break
        out.append(r)
    return out_greeting, out


# ---------------------------------------------------------------- comparing

def jtype(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def short(v, n=70):
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."


class Diffs:
    def __init__(self, allow):
        self.allow = allow
        self.used = set()
        self.rows = []  # (step, what, path, qsd, baton, reason or None)

    def add(self, step, what, path, q, b):
        reason = None
        for i, a in enumerate(self.allow):
            if a["what"] == what and fnmatch.fnmatchcase(step, a.get("step", "*")) \
                    and fnmatch.fnmatchcase(path, a.get("path", "*")):
                reason = a["reason"]
                self.used.add(i)
                break
        self.rows.append((step, what, path, q, b, reason))


def shape(diffs, step, path, q, b):
    tq, tb = jtype(q), jtype(b)
    if tq != tb:
        diffs.add(step, "type", path, f"{tq} {short(q, 40)}", f"{tb} {short(b, 40)}")
        return
    if tq == "object":
        for k in sorted(set(q) - set(b)):
            diffs.add(step, "missing-key", f"{path}.{k}", short(q[k], 50), "<absent>")
        for k in sorted(set(b) - set(q)):
            diffs.add(step, "extra-key", f"{path}.{k}", "<absent>", short(b[k], 50))
        for k in sorted(set(q) & set(b)):
            shape(diffs, step, f"{path}.{k}", q[k], b[k])
    elif tq == "array":
        if bool(q) != bool(b):
            diffs.add(step, "list-empty", path, f"{len(q)} items", f"{len(b)} items")
            return
        if len(q) != len(b):
            diffs.add(step, "list-length", path, f"{len(q)} items", f"{len(b)} items")
        for i, (x, y) in enumerate(zip(q, b)):
            # name node entries by node-name (and their drivers) so the table says which node
            if isinstance(x, dict) and isinstance(y, dict) and "node-name" in x and x.get("node-name") == y.get("node-name"):
                sub = f"{path}[{x['node-name']}:{x.get('drv')}]"
            else:
                sub = f"{path}[{i}]"
            shape(diffs, step, sub, x, y)


def node_digest(nodes):
    out = []
    for n in nodes:
        out.append({
            "node-name": n.get("node-name"), "drv": n.get("drv"), "active": n.get("active"), "ro": n.get("ro"),
            "virtual-size": n.get("image", {}).get("virtual-size"),
            "bitmaps": [[x.get(k) for k in ("name", "recording", "granularity", "count", "busy", "persistent")]
                        for x in n.get("dirty-bitmaps", [])],
        })
    return out


def compare_values(diffs, step, path, q, b):
    if q != b:
        diffs.add(step, "value", path, short(q, 60), short(b, 60))


def compare_digest(diffs, step, kind, q, b):
    if kind == "version":
        compare_values(diffs, step, "return.qemu", q.get("qemu"), b.get("qemu"))
        compare_values(diffs, step, "return.package", q.get("package"), b.get("package"))
    elif kind == "sha256":
        hq, hb = q.get("sha256", ""), b.get("sha256", "")
        if not re.fullmatch(r"[0-9a-f]{64}", str(hb)):
            diffs.add(step, "value", "return.sha256 (format)", short(hq), short(hb))
        compare_values(diffs, step, "return.sha256", hq, hb)
    elif kind == "exports":
        key = lambda e: [e.get(k) for k in ("id", "node-name", "type", "shutting-down")]  # noqa: E731
        compare_values(diffs, step, "exports", [key(e) for e in q], [key(e) for e in b])
    elif kind == "jobs":
        key = lambda j: [j.get(k) for k in ("id", "type", "status")]  # noqa: E731
        compare_values(diffs, step, "jobs", [key(j) for j in q], [key(j) for j in b])
    elif kind == "block-jobs":
        key = lambda j: [j.get(k) for k in ("device", "type", "ready", "status", "paused", "io-status")]  # noqa: E731
        compare_values(diffs, step, "block-jobs", [key(j) for j in q], [key(j) for j in b])
    elif kind == "nodes":
        dq, db = node_digest(q), node_digest(b)
        compare_values(diffs, step, "nodes.order", [n["node-name"] for n in dq], [n["node-name"] for n in db])
        bq = {n["node-name"]: n for n in dq}
        for n in db:
            m = bq.get(n["node-name"])
            if not m:
                continue
            for k in ("drv", "active", "ro", "virtual-size"):
                compare_values(diffs, step, f"nodes[{n['node-name']}].{k}", m[k], n[k])
            compare_values(diffs, step, f"nodes[{n['node-name']}].dirty-bitmaps.order",
                           [x[0] for x in m["bitmaps"]], [x[0] for x in n["bitmaps"]])
            bb = {x[0]: x for x in m["bitmaps"]}
            fields = ("name", "recording", "granularity", "count", "busy", "persistent")
            for x in n["bitmaps"]:
                if x[0] in bb:
                    for k, vq, vb in zip(fields, bb[x[0]], x):
                        compare_values(diffs, step, f"nodes[{n['node-name']}].dirty-bitmaps[{x[0]}].{k}", vq, vb)


def schema_members(index, tname):
    """Argument members of an object type: {name: optional}, flat-union variants included."""
    t = index.get(tname, {})
    if t.get("meta-type") != "object":
        return None
    m = {x["name"]: "default" in x for x in t.get("members", [])}
    for v in t.get("variants", []):
        vm = schema_members(index, v["type"]) or {}
        for k, o in vm.items():
            m.setdefault(k, o)
    return m


def compare_special(diffs, step, kind, q, b):
    if kind == "commands":
        qn = {c.get("name") for c in q}
        bn = [c.get("name") for c in b]
        for c in b:
            if set(c) != {"name"}:
                diffs.add(step, "extra-key", f"return[{c.get('name')}]", "{name}", short(sorted(c)))
        for n in bn:
            if n not in qn and not n.startswith("x-baton-"):
                diffs.add(step, "value", f"command {n}", "<absent>", "present")
        return sorted(n for n in bn)
    if kind == "schema":
        for tag, lst in (("QSD", q), ("baton", b)):
            bad = [e for e in lst if not isinstance(e, dict) or not isinstance(e.get("name"), str)
                   or not isinstance(e.get("meta-type"), str)]
            if bad or not isinstance(lst, list):
                diffs.add(step, "type", f"{tag} schema entries", "list of {name, meta-type}", short(bad[:1]))
        qi = {e["name"]: e for e in q if isinstance(e, dict) and "name" in e}
        bi = {e["name"]: e for e in b if isinstance(e, dict) and "name" in e}
        for name, e in bi.items():
            mt = e.get("meta-type")
            if mt not in ("command", "event") or name.lower().replace("_", "-").startswith("x-baton-"):
                continue
            qe = qi.get(name)
            if qe is None:
                diffs.add(step, "value", f"schema {name}", "<absent>", mt)
                continue
            if qe.get("meta-type") != mt:
                diffs.add(step, "value", f"schema {name}.meta-type", qe.get("meta-type"), mt)
                continue
            qm = schema_members(qi, qe.get("arg-type"))
            bmm = schema_members(bi, e.get("arg-type"))
            if qm is None or bmm is None:
                diffs.add(step, "type", f"schema {name}.arg-type", str(qm is not None), str(bmm is not None))
                continue
            for k in sorted(bmm):
                if k not in qm:
                    if not k.startswith("x-baton-"):
                        diffs.add(step, "extra-key", f"schema {name}.arg.{k}", "<absent>", "present")
                elif qm[k] != bmm[k]:
                    diffs.add(step, "value", f"schema {name}.arg.{k}.optional", qm[k], bmm[k])
            if mt == "command":
                rq = qi.get(qe.get("ret-type"), {}).get("meta-type")
                rb = bi.get(e.get("ret-type"), {}).get("meta-type")
                if rq != rb:
                    diffs.add(step, "value", f"schema {name}.ret-type.meta-type", rq, rb)
            for k in sorted(set(e) - set(qe)):
                if k not in ("arg-type", "ret-type"):
                    diffs.add(step, "extra-key", f"schema {name}.{k}", "<absent>", short(e[k]))
        return None
    return None


def fmt_reply(r):
    if "error" in r:
        return f"error {r['error'].get('class')}: {r['error'].get('desc')}"
    return f"return {short(r.get('return'), 50)}"


def event_sig(e):
    """Name, data keys and envelope keys; for job events also the id and status
    (the job state machine must match, not just the shape)."""
    data = e.get("data") or {}
    vals = tuple((k, data[k]) for k in ("id", "device", "status", "type") if k in data and e.get("event", "").startswith(("JOB_", "BLOCK_JOB_")))
    return (e.get("event"), tuple(sorted(data.keys())), tuple(sorted(e.keys())), vals)


def compare_all(diffs, gq, gb, rq, rb):
    shape(diffs, "greeting", "QMP", gq.get("QMP"), gb.get("QMP"))
    compare_values(diffs, "greeting", "QMP.version.qemu", gq.get("QMP", {}).get("version", {}).get("qemu"),
                   gb.get("QMP", {}).get("version", {}).get("qemu"))
    compare_values(diffs, "greeting", "QMP.version.package", gq.get("QMP", {}).get("version", {}).get("package"),
                   gb.get("QMP", {}).get("version", {}).get("package"))
    compare_values(diffs, "greeting", "QMP.capabilities", gq.get("QMP", {}).get("capabilities"),
                   gb.get("QMP", {}).get("capabilities"))
    covered = []
    baton_cmds = []
    for st, a, b in zip(SCENARIO, rq, rb):
        step = st["label"]
        if st["op"] == "qmp":
            covered.append(st["cmd"])
        if not st["compare"]:
            continue
        if st["op"] == "qmp" and st["expect"]:
            for tag, res in (("QSD", a), ("baton", b)):
                rep = res["reply"] or {}
                prob = st["expect"](rep) if "__exception__" not in rep else "not run"
                if prob:
                    diffs.add(step, "expect", f"{tag} reply", "as expected" if tag == "baton" else prob,
                              prob if tag == "baton" else "-")
        if st["op"] != "qmp":
            if a["note"] != b["note"]:
                diffs.add(step, "value", "outcome", short(a["note"], 80), short(b["note"], 80))
        else:
            x, y = a["reply"], b["reply"]
            if "__exception__" in x or "__exception__" in y:
                diffs.add(step, "kind", "reply", short(x.get("__exception__", "ok")), short(y.get("__exception__", "ok")))
                continue
            kx = "return" if "return" in x else "error"
            ky = "return" if "return" in y else "error"
            if kx != ky:
                diffs.add(step, "kind", "reply", fmt_reply(x), fmt_reply(y))
            elif kx == "error":
                ex, ey = x["error"], y["error"]
                if ex.get("class") != ey.get("class"):
                    diffs.add(step, "class", "error.class", ex.get("class"), ey.get("class"))
                if ex.get("desc") != ey.get("desc"):
                    diffs.add(step, "desc-exact" if st["exact_desc"] else "desc", "error.desc",
                              ex.get("desc"), ey.get("desc"))
                if not ey.get("desc"):
                    diffs.add(step, "value", "error.desc (empty)", ex.get("desc"), ey.get("desc"))
            else:
                if st["special"]:
                    names = compare_special(diffs, step, st["special"], x["return"], y["return"])
                    if names:
                        baton_cmds = names
                else:
                    shape(diffs, step, "return", x["return"], y["return"])
                    if st["digest"]:
                        compare_digest(diffs, step, st["digest"], x["return"], y["return"])
        # events of this step
        sx = [event_sig(e) for e in a["events"]]
        sy = [event_sig(e) for e in b["events"]]
        if sx != sy:
            def ev_str(sig):
                out = []
                for name, keys, env, vals in sig:
                    v = ",".join(str(x[1]) for x in vals if x[0] == "status")
                    out.append(f"{name}{'(' + v + ')' if v else ''}{{{','.join(keys)}}}")
                return " ".join(out) or "none"
            diffs.add(step, "event", "events", ev_str(sx), ev_str(sy))
    return covered, baton_cmds


def main():
    if not BATON or not os.access(BATON, os.X_OK):
        print(f"FAIL: set BATON to the baton binary (got {BATON!r})")
        return 1
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        print("FAIL: qemu-storage-daemon (the reference) is not installed")
        return 1
    with open(os.path.join(HERE, "allowlist.json")) as f:
        allow = json.load(f).get("conformance", [])
    for a in allow:
        if not a.get("reason") or not a.get("what"):
            print(f"FAIL: allowlist entry without a what/reason: {a}")
            return 1
    tmp = tempfile.mkdtemp(prefix="baton-qmp-conf-")
    daemons = []
    failures = []
    try:
        results = {}
        for tag, argv0 in (("qsd", [qsd]), ("baton", [BATON, "daemon"])):
            d = Daemon(tag, argv0, tmp)
            daemons.append(d)
            results[tag] = run_scenario(d)
            d.close()
        gq, rq = results["qsd"]
        gb, rb = results["baton"]
        diffs = Diffs(allow)
        covered, baton_cmds = compare_all(diffs, gq, gb, rq, rb)

        # sanity: the reference itself must have behaved as scripted
        for st, a in zip(SCENARIO, rq):
            if a["reply"] and "__exception__" in a["reply"]:
                failures.append(f"QSD run broke at {st['label']!r}: {a['reply']['__exception__']}")

        cov = sorted(set(covered))
        print(f"commands covered ({len(cov)}): {', '.join(cov)}")
        qsd_cmds = {c.get("name") for c in rq[SCENARIO.index(next(x for x in SCENARIO if x.get("special") == "commands"))]["reply"].get("return", [])}
        not_cov = [c for c in baton_cmds if c not in cov]
        print(f"baton commands not covered: {', '.join(c + ('' if c in qsd_cmds else ' (not in QSD)') for c in not_cov) or 'none'}")
        steps = sum(1 for s in SCENARIO if s["compare"])
        print(f"steps compared: {steps} (+ greeting)")

        bad = [r for r in diffs.rows if r[5] is None]
        ok = [r for r in diffs.rows if r[5] is not None]

        def table(rows, title, with_reason):
            print(f"\n{title} ({len(rows)}):")
            if not rows:
                return
            # The same difference seen at several steps is shown once.
            groups = {}
            for r in rows:
                groups.setdefault((r[1], r[2], r[3], r[4], r[5]), []).append(r[0])
            rows = [(steps[0] + (f" (+{len(steps) - 1} more)" if len(steps) > 1 else ""),) + k + (steps,)
                    for k, steps in groups.items()]
            hdr = ("step", "what", "path", "QSD", "baton")
            cols = [[str(r[i]) for r in rows] + [hdr[i]] for i in range(5)]
            w = [min(max(len(x) for x in c), m) for c, m in zip(cols, (56, 11, 44, 60, 60))]
            fmt = lambda r: "  ".join(str(r[i])[: w[i]].ljust(w[i]) for i in range(5))  # noqa: E731
            print("  " + fmt(hdr))
            print("  " + "  ".join("-" * x for x in w))
            for r in rows:
                print("  " + fmt(r))
                if with_reason:
                    print(f"  {'':{w[0]}}  allowed: {r[5]}")
            long_rows = [r for r in rows if any(len(str(r[i])) > w[i] for i in (2, 3, 4)) or len(r[6]) > 1]
            if long_rows:
                print("\n  in full:")
                for r in long_rows:
                    print(f"  * {r[0]} / {r[1]} {r[2]}\n      QSD:   {r[3]}\n      baton: {r[4]}")
                    if len(r[6]) > 1:
                        print(f"      at steps: {'; '.join(r[6])}")

        print(f"\nallowed differences (allowlist.json): {len(ok)}")
        by_reason = {}
        for r in ok:
            by_reason.setdefault(r[5], []).append(r)
        for reason, rs in by_reason.items():
            print(f"  [{len(rs)}x] {reason}")
            for r in rs[:3]:
                print(f"        e.g. {r[0]}: {r[2]}: QSD {short(str(r[3]), 60)} / baton {short(str(r[4]), 60)}")
        table(bad, "MISMATCHES (not in allowlist.json)", False)
        unused = [a for i, a in enumerate(allow) if i not in diffs.used]
        if unused:
            print("\nnote: allowlist entries that matched nothing (stale?):")
            for a in unused:
                print(f"  - {a}")
        for r in bad:
            failures.append(f"{r[0]}: {r[1]} {r[2]}: QSD {r[3]} / baton {r[4]}")
        if bad:
            print(f"\n{len(bad)} mismatching comparisons at "
                  f"{len({r[0] for r in bad})} steps; a step's own label says what it does")
    except Exception as e:  # noqa: BLE001
        failures.append(f"exception: {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    finally:
        for d in daemons:
            d.close()
            if failures and os.path.exists(d.logpath) and os.path.getsize(d.logpath):
                print(f"---- {d.tag} output ----")
                print(open(d.logpath, errors="replace").read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"\nconformance.py: FAILED ({len(failures)} failure(s))")
        return 1
    print("\nconformance.py: baton matches qemu-storage-daemon (modulo allowlist.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
