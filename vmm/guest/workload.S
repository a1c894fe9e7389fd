# The guest workload: 32-bit protected mode, flat segments, no paging, no
# interrupts. It is its own oracle. Every 4 KiB block it writes holds, in
# every 32-bit word, pattern(block, generation), written with one `rep
# stosd` and checked with one `repe scasd`; the table of the latest
# generation of each block lives in guest RAM (GEN_TABLE), so it migrates
# with the guest, and a write lost anywhere in a handover shows up as a
# mismatch. Counters are published in the shared page for the VMM.
#
# Loop: a batch of writes (distinct blocks, several requests in flight), one
# read-back check of a random written block, some RAM pages dirtied; and on
# request (VERIFY_REQ != VERIFY_DONE) a full pass over every written block.
#
# The guest checks its CPU state too: xmm0 holds a counter (four lanes,
# from the seed) that goes up by one each batch, xmm1 a constant (the seed
# inverted, never reloaded); ST_CPU_COPY holds what the two must be. Only
# XSAVE (or the FPU state) carries the xmm registers across a migration, so
# a build that drops them shows up in ST_CPU_MISMATCHES (and ST_MISMATCHES).
# KVM may emulate this guest (a nested host runs it instruction by
# instruction), and its emulator knows SSE moves but no SSE arithmetic: the
# registers are only stored, loaded and compared in RAM. SSE is on from the
# VMM (CR0.MP, CR4.OSFXSR|OSXMMEXCPT).

.intel_syntax noprefix
.code32
.include "layout.inc"

.text
.globl start
start:
    mov esp, STACK_TOP
    mov eax, [CFG_SEED]
    or eax, 1
    mov [ST_RNG], eax
    mov [ST_CPU_COPY], eax
    mov [ST_CPU_COPY + 4], eax
    mov [ST_CPU_COPY + 8], eax
    mov [ST_CPU_COPY + 12], eax
    not eax
    mov [ST_CPU_COPY + 16], eax
    mov [ST_CPU_COPY + 20], eax
    mov [ST_CPU_COPY + 24], eax
    mov [ST_CPU_COPY + 28], eax
    movdqa xmm0, xmmword ptr [ST_CPU_COPY]
    movdqa xmm1, xmmword ptr [ST_CPU_COPY + 16]

main_loop:
    mov eax, [VERIFY_REQ]
    cmp eax, [VERIFY_DONE]
    jne full_pass
    call write_batch
    call check_one
    call dirty_ram
    call check_sse
    inc dword ptr [ST_BATCHES]
    jmp main_loop

# xmm0 and xmm1 must still be what ST_CPU_COPY says; then the counter goes
# up by one, in RAM and in xmm0. A mismatch is counted once: xmm1 is set
# again from its copy.
check_sse:
    movdqa xmmword ptr [ST_CPU_SEEN], xmm0
    movdqa xmmword ptr [ST_CPU_SEEN + 16], xmm1
    mov esi, ST_CPU_SEEN
    mov edi, ST_CPU_COPY
    mov ecx, 8
    repe cmpsd
    je 1f
    inc dword ptr [ST_CPU_MISMATCHES]
    inc dword ptr [ST_MISMATCHES]
    movdqa xmm1, xmmword ptr [ST_CPU_COPY + 16]
1:  inc dword ptr [ST_CPU_COPY]
    inc dword ptr [ST_CPU_COPY + 4]
    inc dword ptr [ST_CPU_COPY + 8]
    inc dword ptr [ST_CPU_COPY + 12]
    movdqa xmm0, xmmword ptr [ST_CPU_COPY]
    ret

# eax <- next xorshift32 value
rand:
    mov eax, [ST_RNG]
    mov edx, eax
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    mov [ST_RNG], eax
    ret

# eax <- pattern(block = ebx, generation = eax); never 0
pattern:
    imul eax, eax, 0x85ebca77
    mov edx, ebx
    inc edx
    imul edx, edx, 0x9e3779b1
    xor eax, edx
    jnz 1f
    inc eax
1:  ret

# Fill slot ecx's descriptor (op = eax, block = ebx, buffer = edi) and mark it pending.
# esi <- descriptor address
fill_desc:
    push eax
    mov esi, ecx
    and esi, RING_SLOTS - 1
    shl esi, 5
    add esi, RING_DESCS
    pop eax
    mov [esi + DESC_OP], eax
    mov dword ptr [esi + DESC_STATUS], STATUS_PENDING
    mov eax, ebx
    shl eax, 3
    mov [esi + DESC_SECTOR], eax
    mov dword ptr [esi + DESC_SECTOR + 4], 0
    mov dword ptr [esi + DESC_COUNT], BLOCK_SIZE / 512
    mov [esi + DESC_BUF], edi
    ret

# Wait until the descriptor at esi is no longer pending; eax <- its status.
wait_desc:
1:  mov eax, [esi + DESC_STATUS]
    cmp eax, STATUS_PENDING
    jne 2f
    pause
    jmp 1b
2:  ret

# A batch of CFG_BATCH writes to distinct blocks, all in flight at once.
write_batch:
    mov ecx, [CFG_BATCH]
    test ecx, ecx
    jz 9f
    cmp ecx, MAX_BATCH
    jbe 1f
    mov ecx, MAX_BATCH
1:  mov [batch_n], ecx
    mov eax, [RING_SUBMIT]
    mov [batch_base], eax
    xor ebp, ebp                      # ebp = i
2:  cmp ebp, [batch_n]
    jae 5f
    # block = (rand % (nblocks / n)) * n + i: distinct per slot
    call rand
    mov ecx, [batch_n]
    mov eax, [CFG_NBLOCKS]
    xor edx, edx
    div ecx                           # eax = nblocks / n
    mov ecx, eax
    test ecx, ecx
    jz 9f
    call rand
    xor edx, edx
    div ecx                           # edx = rand % (nblocks / n)
    mov eax, edx
    mul dword ptr [batch_n]
    add eax, ebp
    mov ebx, eax                      # ebx = block
    mov [batch_blocks + ebp * 4], ebx
    inc dword ptr [GEN_TABLE + ebx * 4]
    mov eax, [GEN_TABLE + ebx * 4]
    call pattern
    mov edi, ebp
    shl edi, 12
    add edi, BUFFERS
    push edi
    mov ecx, BLOCK_SIZE / 4
    rep stosd
    pop edi
    mov ecx, [batch_base]
    add ecx, ebp
    mov eax, OP_WRITE
    call fill_desc
    inc ebp
    jmp 2b
5:  mov eax, [batch_base]
    add eax, [batch_n]
    mov [RING_SUBMIT], eax
    mov dx, DOORBELL_PORT
    out dx, al
    xor ebp, ebp
6:  cmp ebp, [batch_n]
    jae 9f
    mov ecx, [batch_base]
    add ecx, ebp
    mov esi, ecx
    and esi, RING_SLOTS - 1
    shl esi, 5
    add esi, RING_DESCS
    call wait_desc
    test eax, eax
    jnz 7f
    inc dword ptr [ST_WRITES]
    jmp 8f
7:  # The write failed before reaching the disk: it still holds the previous generation.
    inc dword ptr [ST_IOERRORS]
    mov ebx, [batch_blocks + ebp * 4]
    dec dword ptr [GEN_TABLE + ebx * 4]
8:  inc ebp
    jmp 6b
9:  ret

# Read block ebx into CHECK_BUF and compare with its latest generation.
# Sets eax = 0 ok, 1 mismatch, 2 I/O error.
check_block:
    mov edi, CHECK_BUF
    mov ecx, [RING_SUBMIT]
    mov eax, OP_READ
    call fill_desc
    mov eax, [RING_SUBMIT]
    inc eax
    mov [RING_SUBMIT], eax
    mov dx, DOORBELL_PORT
    out dx, al
    call wait_desc
    test eax, eax
    jnz 3f
    mov eax, [GEN_TABLE + ebx * 4]
    call pattern
    mov edi, CHECK_BUF
    mov ecx, BLOCK_SIZE / 4
    repe scasd
    jne 2f
    xor eax, eax
    ret
2:  mov [ST_LAST_BAD], ebx
    mov eax, 1
    ret
3:  mov eax, 2
    ret

# Check one random block that was written.
check_one:
    call rand
    xor edx, edx
    div dword ptr [CFG_NBLOCKS]
    mov ebx, edx
    cmp dword ptr [GEN_TABLE + ebx * 4], 0
    je 9f
    call check_block
    cmp eax, 2
    je 8f
    inc dword ptr [ST_CHECKS]
    test eax, eax
    jz 9f
    inc dword ptr [ST_MISMATCHES]
    jmp 9f
8:  inc dword ptr [ST_IOERRORS]
9:  ret

# Dirty CFG_DIRTY_PAGES random pages of DIRTY_AREA.
dirty_ram:
    mov ecx, [CFG_DIRTY_PAGES]
1:  test ecx, ecx
    jz 9f
    push ecx
    call rand
    xor edx, edx
    mov ecx, DIRTY_PAGES
    div ecx
    shl edx, 12
    mov [DIRTY_AREA + edx], eax
    pop ecx
    dec ecx
    jmp 1b
9:  ret

# Re-read every block ever written; publish the result and acknowledge the request.
full_pass:
    mov eax, [VERIFY_REQ]
    mov [pass_req], eax
    mov dword ptr [VERIFY_CHECKED], 0
    mov dword ptr [VERIFY_BAD], 0
    xor ebx, ebx
1:  cmp ebx, [CFG_NBLOCKS]
    jae 5f
    cmp dword ptr [GEN_TABLE + ebx * 4], 0
    je 4f
    push ebx
    call check_block
    pop ebx
    cmp eax, 2
    jne 2f
    inc dword ptr [ST_IOERRORS]
    jmp 4f
2:  inc dword ptr [VERIFY_CHECKED]
    test eax, eax
    jz 4f
    inc dword ptr [VERIFY_BAD]
4:  inc ebx
    jmp 1b
5:  mov eax, [pass_req]
    mov [VERIFY_DONE], eax
    jmp main_loop

# Variables (no paging: the code page is writable).
.align 4
batch_n:      .long 0
batch_base:   .long 0
pass_req:     .long 0
batch_blocks: .fill MAX_BATCH, 4, 0
