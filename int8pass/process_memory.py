"""Give memory back to the operating system once floating-point weights are gone, so that process RSS (what `ps`
shows) drops by what int8 saves, without the user calling malloc_trim.

Two things keep freed weights in RSS on Linux:
- glibc keeps freed heap memory in its arenas. `return_freed_heap` (malloc_trim(0)) runs after each weight is
  quantized, so one weight's temporaries are gone before the next one's are made. And freeing a large allocation
  raises glibc's dynamic mmap threshold to its size (up to 32 MiB), after which every smaller allocation comes from
  the heap and stays resident after it is freed: once the weights are converted, the temporaries of every later
  call would stay in RSS (~45 MiB measured on 8 linears). `settle` therefore also pins the threshold at glibc's
  initial 128 KiB (large allocations are mmap'd and given back on free, as in a fresh process). Not before: while
  quantizing, that would mmap every block temporary (loading took twice as long);
- a weight read from an mmap'd checkpoint (safetensors) is a view of a mapping that other tensors of the same file
  keep alive, so its pages stay resident after the weight is gone: `page_out` asks the kernel to reclaim them
  (MADV_PAGEOUT: clean file pages are dropped and re-read from the file if touched again; nothing is lost), and
  `release_file_pages` unmaps those of whole files whose tensors were read as copies of slices (tensor parallel).
Both are no-ops where the platform lacks them. And the other way: `prefer_huge_pages` asks for 2 MiB pages for a new
int8 weight's codes before they are written (MADV_HUGEPAGE; Linux's transparent huge pages are commonly on
"madvise"): decode streams every weight once per token, and with 4 KiB pages the TLB misses cost ~7% of the read
rate (measured on a 426 MB token's worth of weights: 22.5 GB/s with 4 KiB pages, 24 GB/s with 2 MiB pages). And
Inductor leaves each compile's state as reference cycles: `settle` collects them, so that the next compile reuses
that memory instead of growing the process (33 MiB less steady RSS on the 1.07 GiB checkpoint of
benchmarks/memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

import torch

log = logging.getLogger("int8pass")

MADV_PAGEOUT = 21  # linux/mman.h, Linux >= 5.4
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
_PAGE = 4096
_HUGE_PAGE = 2 << 20


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


M_MMAP_THRESHOLD = -3  # malloc.h
GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 1024


_PINNED = False


def return_freed_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def settle() -> None:
    """After converting weights or compiling: collect reference cycles, pin glibc's mmap threshold where it starts (once
    per process), return free heap."""
    global _PINNED
    gc.collect()
    if not _PINNED and _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _PINNED = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, GLIBC_INITIAL_MMAP_THRESHOLD))
    return_freed_heap()


def _private_file_mapping(line: str) -> tuple[int, int, str] | None:
    """(start, end, file) from a /proc/self/maps (or smaps header) line of a private file-backed mapping, else None."""
    fields = line.split(maxsplit=5)
    if len(fields) == 6 and fields[5].startswith("/") and fields[1][3] == "p":
        start, end = (int(value, 16) for value in fields[0].split("-"))
        return start, end, fields[5].rstrip("\n")
    return None


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private file-backed mappings."""
    with open("/proc/self/maps") as maps:
        return [mapping[:2] for mapping in map(_private_file_mapping, maps) if mapping is not None]


def prefer_huge_pages(tensor: torch.Tensor) -> None:
    """Advise 2 MiB pages for the whole 2 MiB pages inside a new CPU tensor's bytes (anonymous memory, not yet
    written: the pages are made huge as they are first touched)."""
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() < 2 * _HUGE_PAGE:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
    if last > first and _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_HUGEPAGE) != 0:
        log.debug("llmint8: madvise(MADV_HUGEPAGE) failed with errno %d", ctypes.get_errno())


def page_out(tensor: torch.Tensor) -> int:
    """Reclaim the whole pages of a CPU tensor's bytes that lie in a file mapping (an mmap'd checkpoint); returns the
    bytes advised. Safe while the tensor is alive: the data comes back from the file if read again."""
    if _LIBC is None or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()  # 0 for a wrapper tensor subclass (it has no storage of its own)
    if start == 0:
        return 0
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first or not any(lo <= first and last <= hi for lo, hi in _file_mappings()):
        return 0
    if _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_PAGEOUT) != 0:
        log.debug("llmint8: madvise(MADV_PAGEOUT) failed with errno %d", ctypes.get_errno())
        return 0
    return last - first


def release_file_pages(suffix: str) -> int:
    """Drop this process's resident pages of every mapping of a file whose name ends with `suffix` and whose pages
    this process never wrote; returns the bytes advised. For checkpoints read by slices (tensor parallel): the slices
    are copies, the pages they were read from (all of a weight's when its columns are sliced) stay mapped, and the
    other ranks map the same pages, which MADV_PAGEOUT then skips. MADV_DONTNEED unmaps them from this process only: a
    later read maps them again from the page cache or the file. A page written through a private mapping would be
    lost, so a mapping with any (smaps' Anonymous > 0) is left alone."""
    if _LIBC is None:
        return 0
    advised = 0
    for start, end, file, written in _file_mappings_written():
        if (file.endswith(suffix) and not written
                and _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0):
            advised += end - start
    return advised


def _file_mappings_written() -> list[tuple[int, int, str, bool]]:
    """(start, end, file, written) of this process's private file-backed mappings, written: any page of it holds a
    private copy (copy on write)."""
    ranges = []
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                mapping = _private_file_mapping(line)
                current = None if mapping is None else [*mapping, False]
                if current is not None:
                    ranges.append(current)
            elif current is not None and fields[0] == "Anonymous:":
                current[3] = int(fields[1]) > 0
    return [tuple(entry) for entry in ranges]
