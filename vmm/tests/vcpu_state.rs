#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The whole vCPU moves: each part of its state, set to a distinctive value
//! on the source's vCPU (loaded into KVM and read back), goes through the
//! migration stream's encoding into a fresh VM, and KVM there reports the
//! same value. Each test fails if its part is not carried. And the guest's
//! own check of its SSE registers catches a migration that drops XSAVE.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{Graph, PermSet};
use common::kvm_or_skip;
use serde_json::json;
use vmm::stream::{self, Section};
use vmm::vcpu::{lapic_reg, set_lapic_reg, VcpuState, APIC_LVTT, APIC_TPR, MSR_IA32_TSC_DEADLINE};
use vmm::vm::VmState;
use vmm::{RunState, Vm, VmConfig};

struct Host {
    vm: Arc<Vm>,
    disk: std::path::PathBuf,
    _g: Arc<Graph>,
}

/// A VM on its own file disk (a copy of `from`, if given).
async fn host(dir: &tempfile::TempDir, name: &str, cfg: &VmConfig, incoming: bool, from: Option<&Host>) -> Host {
    let disk = dir.path().join(format!("{name}.img"));
    match from {
        Some(h) => {
            std::fs::copy(&h.disk, &disk).unwrap();
        }
        None => std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap(),
    }
    let g = Arc::new(Graph::new());
    g.blockdev_add(&json!({"driver": "file", "node-name": "d", "filename": disk})).await.unwrap();
    let be = g.attach("d", "guest disk", PermSet::GUEST_WRITER, true).unwrap();
    let vm = Vm::new(cfg.clone(), be, tokio::runtime::Handle::current(), Arc::new(|_: &str, _| {}), incoming).unwrap();
    Host { vm, disk, _g: g }
}

/// The vCPUs, the KVM clock and the device through the stream's encoding
/// and its strict reader, as a migration sends them (RAM as it is).
async fn through_stream(st: &VmState) -> VmState {
    let mut w = Vec::new();
    stream::write_header(&mut w).await.unwrap();
    for (id, v) in st.vcpus.iter().enumerate() {
        stream::write_vcpu(&mut w, id as u32, v).await.unwrap();
    }
    stream::write_device(&mut w, st.device).await.unwrap();
    stream::write_kvmclock(&mut w, st.clock).await.unwrap();
    stream::write_end(&mut w, false).await.unwrap();
    let mut r = &w[..];
    stream::read_header(&mut r).await.unwrap();
    let mut out = VmState { memory: st.memory, ram: st.ram.clone(), vcpus: Vec::new(), device: 0, clock: 0 };
    loop {
        match stream::read_section(&mut r).await.unwrap() {
            Section::Vcpu { id, state } => {
                assert_eq!(id as usize, out.vcpus.len());
                out.vcpus.push(*state);
            }
            Section::Device { consumed } => out.device = consumed,
            Section::KvmClock { clock } => out.clock = clock,
            Section::End { .. } => return out,
            s => panic!("unexpected {}", s.name()),
        }
    }
}

/// Set a state on a (never run) source VM with `tweak`, read back what KVM
/// took, move it through the stream into a fresh VM, read that one back.
/// Returns (the source's state, the destination's).
async fn carried(cfg: VmConfig, tweak: impl FnOnce(&mut VmState)) -> (VmState, VmState) {
    let dir = tempfile::tempdir().unwrap();
    let src = host(&dir, "src", &cfg, false, None).await;
    let mut st = src.vm.save().await.unwrap();
    tweak(&mut st);
    src.vm.restore(&st).await.unwrap();
    let set = src.vm.save().await.unwrap();
    let sent = through_stream(&set).await;
    let dst = host(&dir, "dst", &cfg, true, None).await;
    dst.vm.restore(&sent).await.unwrap();
    let got = dst.vm.save().await.unwrap();
    src.vm.shutdown().await;
    dst.vm.shutdown().await;
    (set, got)
}

fn v0(st: &VmState) -> &VcpuState {
    &st.vcpus[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn general_and_segment_registers_move() {
    if !kvm_or_skip() {
        return;
    }
    let (set, got) = carried(VmConfig::default(), |st| {
        let v = &mut st.vcpus[0];
        v.regs.rbx = 0x1122_3344_5566_7788;
        v.regs.r13 = 0x0bad_cafe;
        v.sregs.cr2 = 0xdead_b000;
        v.sregs.idt.base = 0x7_0000;
        v.sregs.idt.limit = 0x7ff;
    })
    .await;
    assert_eq!(v0(&set).regs.rbx, 0x1122_3344_5566_7788, "KVM took the source's value");
    assert_eq!(v0(&got).regs, v0(&set).regs);
    assert_eq!(v0(&got).sregs.cr2, 0xdead_b000);
    assert_eq!(v0(&got).sregs, v0(&set).sregs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_registers_move_in_the_xsave_state() {
    if !kvm_or_skip() {
        return;
    }
    let x7 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
    let (set, got) = carried(VmConfig::default(), |st| {
        st.vcpus[0].set_xmm(7, x7);
        st.vcpus[0].set_xmm(2, !x7);
    })
    .await;
    assert_eq!(v0(&set).xmm(7), x7, "KVM took the source's xmm7");
    assert_eq!(v0(&got).xmm(7), x7);
    assert_eq!(v0(&got).xmm(2), !x7);
    // The whole legacy area (x87, MXCSR, every xmm register) and the XSAVE header.
    assert_eq!(v0(&got).xsave[..(512 + 64) / 4], v0(&set).xsave[..(512 + 64) / 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xcr0_moves() {
    if !kvm_or_skip() {
        return;
    }
    let xcr0 = |v: &VcpuState| {
        v.xcrs.xcrs[..v.xcrs.nr_xcrs as usize].iter().find(|x| x.xcr == 0).map(|x| x.value).unwrap_or(0)
    };
    let (set, got) = carried(VmConfig::default(), |st| {
        let x = &mut st.vcpus[0].xcrs;
        x.nr_xcrs = 1;
        x.xcrs[0].xcr = 0;
        x.xcrs[0].value = 0b111; // x87 | SSE | AVX
    })
    .await;
    assert_eq!(xcr0(v0(&set)), 0b111, "KVM took the source's XCR0");
    assert_eq!(xcr0(v0(&got)), 0b111);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msrs_move() {
    if !kvm_or_skip() {
        return;
    }
    let lstar = 0xffff_ffff_8123_4560u64;
    let wanted = [
        (0xc000_0082u32, lstar),              // LSTAR
        (0x176, 0x00c0_ffee),                 // SYSENTER_EIP
        (0x174, 0x10),                        // SYSENTER_CS
        (0xc000_0081, 0x0023_0010_0000_0000), // STAR
        (0xc000_0102, 0xffff_8880_1234_5000), // KERNEL_GS_BASE
        (0xc000_0084, 0x4_7700),              // SFMASK
        (0x277, 0x0007_0106_0007_0406),       // PAT
        (0xc000_0103, 0x42),                  // TSC_AUX (where this host's KVM carries it)
    ];
    let tsc = 0x10_0000_0000_0000u64;
    let (set, got) = carried(VmConfig::default(), |st| {
        let v = &mut st.vcpus[0];
        for (index, value) in wanted {
            if v.msr(index).is_some() {
                v.set_msr(index, value);
            }
        }
        v.set_msr(0x10, tsc);
    })
    .await;
    let (s, g) = (v0(&set), v0(&got));
    assert!(s.msr(0xc000_0082).is_some() && s.msr(0x176).is_some(), "LSTAR and SYSENTER_EIP are carried here");
    for (index, value) in wanted {
        if let Some(v) = s.msr(index) {
            assert_eq!(v, value, "KVM took MSR {index:#x} on the source");
            assert_eq!(g.msr(index), Some(value), "MSR {index:#x}");
        }
    }
    // Every MSR the source read, the destination has (the TSC moves on, slightly).
    let have: Vec<u32> = g.msrs.iter().map(|e| e.index).collect();
    assert_eq!(have, s.msrs.iter().map(|e| e.index).collect::<Vec<_>>());
    // The TSC goes on from the source's, where KVM lets the VMM set it (a
    // nested host's may not: there the guest's TSC is the host's).
    let (s_tsc, g_tsc) = (s.msr(0x10).unwrap(), g.msr(0x10).unwrap());
    if s_tsc >= tsc {
        assert!(g_tsc >= s_tsc && g_tsc - s_tsc < 60 * 5_000_000_000, "{s_tsc:#x} -> {g_tsc:#x}");
    } else {
        eprintln!("this host's KVM does not take a TSC from the VMM ({tsc:#x} set, {s_tsc:#x} read)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_apic_and_its_tsc_deadline_move() {
    if !kvm_or_skip() {
        return;
    }
    let mut deadline = 0;
    let (set, got) = carried(VmConfig::default(), |st| {
        let v = &mut st.vcpus[0];
        set_lapic_reg(&mut v.lapic, 0xf0, 0x1ff); // SVR: software-enabled
        set_lapic_reg(&mut v.lapic, APIC_TPR, 0x20);
        set_lapic_reg(&mut v.lapic, APIC_LVTT, 0x4_00ef); // TSC-deadline mode, vector 0xef
                                                          // Far off (about 1000 s): it does not fire during the test.
        if v.msr(MSR_IA32_TSC_DEADLINE).is_some() {
            deadline = v.msr(0x10).unwrap() + 3_000_000_000_000;
            v.set_msr(MSR_IA32_TSC_DEADLINE, deadline);
        }
    })
    .await;
    let (s, g) = (v0(&set), v0(&got));
    assert_eq!(lapic_reg(&s.lapic, APIC_TPR), 0x20, "KVM took the source's TPR");
    assert_eq!(lapic_reg(&g.lapic, APIC_TPR), 0x20);
    assert_eq!(lapic_reg(&g.lapic, APIC_LVTT), 0x4_00ef);
    assert_eq!(lapic_reg(&g.lapic, 0xf0), 0x1ff);
    if deadline != 0 {
        // Restored after the APIC (KVM ignores it while the timer is not in TSC-deadline mode).
        assert_eq!(s.msr(MSR_IA32_TSC_DEADLINE), Some(deadline), "KVM took the deadline on the source");
        assert_eq!(g.msr(MSR_IA32_TSC_DEADLINE), Some(deadline));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_vcpu_events_move() {
    if !kvm_or_skip() {
        return;
    }
    let (set, got) = carried(VmConfig::default(), |st| {
        let e = &mut st.vcpus[0].events;
        e.nmi.pending = 1;
        e.nmi.masked = 1;
        e.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
    })
    .await;
    let (s, g) = (&v0(&set).events, &v0(&got).events);
    assert_eq!((s.nmi.pending, s.nmi.masked), (1, 1), "KVM took the source's NMI state");
    assert_eq!((g.nmi.pending, g.nmi.masked), (1, 1), "a pending NMI, NMIs blocked");
    assert_eq!(g.exception, s.exception);
    assert_eq!(g.interrupt, s.interrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_registers_move() {
    if !kvm_or_skip() {
        return;
    }
    let db = [0x1000, 0x2_2000, 0x33_3000, 0x444_4000];
    let (set, got) = carried(VmConfig::default(), |st| {
        let d = &mut st.vcpus[0].debugregs;
        d.db = db;
        d.dr7 = 0x455; // L0..L3
    })
    .await;
    assert_eq!(v0(&set).debugregs.db, db, "KVM took the source's DR0..DR3");
    assert_eq!(v0(&got).debugregs.db, db);
    assert_eq!(v0(&got).debugregs.dr7, 0x455);
    assert_eq!(v0(&got).debugregs.dr6, v0(&set).debugregs.dr6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mp_state_moves() {
    if !kvm_or_skip() {
        return;
    }
    let cfg = VmConfig { vcpus: 2, ..VmConfig::default() };
    let (set, got) = carried(cfg, |st| {
        st.vcpus[1].mp_state.mp_state = kvm_bindings::KVM_MP_STATE_HALTED;
    })
    .await;
    assert_eq!(set.vcpus[0].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    assert_eq!(set.vcpus[1].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_HALTED, "KVM took the source's");
    assert_eq!(got.vcpus[0].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    assert_eq!(got.vcpus[1].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_HALTED);
    // Each vCPU keeps its own APIC (its id in the APIC's ID register, bits 31:24).
    assert_eq!(lapic_reg(&got.vcpus[1].lapic, 0x20) >> 24, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kvm_clock_moves() {
    if !kvm_or_skip() {
        return;
    }
    let at = 1_000_000_000_000u64; // 1000 s
    let (set, got) = carried(VmConfig::default(), |st| st.clock = at).await;
    let ten_s = 10_000_000_000;
    assert!(set.clock >= at && set.clock < at + ten_s, "KVM took the source's clock: {}", set.clock);
    assert!(got.clock >= set.clock && got.clock < set.clock + ten_s, "{} -> {}", set.clock, got.clock);
}

/// Run the guest until it has done `n` more batches.
async fn run_batches(vm: &Vm, n: u32) {
    let start = vm.stats().batches;
    vm.cont().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.stats().batches < start + n {
        assert!(Instant::now() < deadline, "the guest is stuck: {:?} {:?}", vm.stats(), vm.fatal_error());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.stop().await.unwrap();
}

/// The guest keeps a counter in xmm0 and a constant in xmm1 and checks both
/// each batch: a destination that got the whole vCPU counts no mismatch; one
/// whose XSAVE state was dropped (as a build that does not carry it would
/// leave it: the fresh vCPU's) counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_catches_a_migration_that_drops_its_sse_registers() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = VmConfig::default();
    let src = host(&dir, "src", &cfg, false, None).await;
    run_batches(&src.vm, 5).await;
    let before = src.vm.stats();
    assert_eq!((before.mismatches, before.cpu_mismatches), (0, 0), "{before:?}");
    let st = through_stream(&src.vm.save().await.unwrap()).await;
    assert_ne!(st.vcpus[0].xmm(1), 0, "the guest's constant is in xmm1");

    // The whole vCPU: the guest's check passes.
    let whole = host(&dir, "whole", &cfg, true, Some(&src)).await;
    whole.vm.restore(&st).await.unwrap();
    whole.vm.set_state(RunState::Paused);
    run_batches(&whole.vm, 3).await;
    let s = whole.vm.stats();
    assert_eq!((s.mismatches, s.cpu_mismatches), (0, 0), "the guest finds its registers: {s:?}");

    // Without XSAVE: what a fresh vCPU holds instead of the source's.
    let fresh = host(&dir, "fresh", &cfg, true, None).await;
    let init = fresh.vm.save().await.unwrap().vcpus[0].xsave.clone();
    fresh.vm.shutdown().await;
    let mut lost = st.clone();
    lost.vcpus[0].xsave = init;
    let dropped = host(&dir, "dropped", &cfg, true, Some(&src)).await;
    dropped.vm.restore(&lost).await.unwrap();
    dropped.vm.set_state(RunState::Paused);
    run_batches(&dropped.vm, 3).await;
    let s = dropped.vm.stats();
    assert_eq!(s.cpu_mismatches, 1, "the guest caught its lost registers (once): {s:?}");
    assert_eq!(s.mismatches, 1, "{s:?}");
    for h in [src, whole, dropped] {
        h.vm.shutdown().await;
    }
}

/// With the in-kernel LAPIC an idle vCPU's HLT sleeps inside KVM_RUN (no
/// exit to user space): `stop` still takes it out at once (the kick's EINTR),
/// its MP state says halted, and it halts again after every `cont`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_vcpus_sleep_in_kvm_run_and_stop_promptly() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = VmConfig { vcpus: 3, ..VmConfig::default() };
    let h = host(&dir, "src", &cfg, false, None).await;
    let fresh = h.vm.save().await.unwrap();
    assert!(fresh.vcpus.iter().all(|v| v.mp_state.mp_state == kvm_bindings::KVM_MP_STATE_RUNNABLE), "APs need no SIPI");
    for round in 0..3 {
        let before = h.vm.stats().batches;
        h.vm.cont().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(h.vm.vcpus_in_run(), "round {round}: running");
        let t = Instant::now();
        h.vm.stop().await.unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "round {round}: stop took {took:?}");
        assert!(!h.vm.vcpus_in_run(), "round {round}: every vCPU left KVM_RUN");
        assert!(h.vm.stats().batches > before, "round {round}: the guest ran");
        let st = h.vm.save().await.unwrap();
        for (id, v) in st.vcpus.iter().enumerate().skip(1) {
            assert_eq!(
                v.mp_state.mp_state,
                kvm_bindings::KVM_MP_STATE_HALTED,
                "round {round}: vCPU {id} sleeps in HLT"
            );
        }
        assert_eq!(st.vcpus[0].mp_state.mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    }
    assert_eq!(h.vm.stats().mismatches, 0);
    h.vm.shutdown().await;
}
