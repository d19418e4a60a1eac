// SPDX-License-Identifier: GPL-2.0
/*
 * vmsync.ko: pages the VMM itself writes into guest RAM.
 *
 * KVM's dirty log sees what vCPUs write through the second-level page
 * tables.  QEMU also writes guest RAM through its own mapping: virtio-blk
 * reads a disk block into a guest buffer, virtqueues get their used rings
 * and status bytes, device models fill guest memory.  Those writes go
 * through the VMM's page tables and never reach KVM's log.
 *
 * The module follows them in the VMM's page tables.  Guest RAM must be a
 * shared file mapping (QEMU's memory-backend-file share=on, a memfd; what
 * vmsync runs).  Per harvest, for each followed slot, it walks the VMM's
 * page table entries over the slot's host range:
 *
 *  - A present entry with the hardware dirty bit was written through since
 *    it was last made clean.  A writable one may have been written without
 *    it: the kernel writing for the VMM through get_user_pages() (an
 *    O_DIRECT read, process_vm_writev()) finds a writable entry and sets no
 *    dirty bit.  An entry with soft-dirty was written and then cleaned by
 *    someone else since our last look: writeback of a file on a disk
 *    cleans the pages it writes and keeps soft-dirty.  Each such page is
 *    reported and reset: folio_mkclean() write-protects and cleans every
 *    shared mapping of it (with the TLB flush and MMU notifier writeback
 *    uses; the folio is marked dirty, so no data is dropped), then
 *    soft-dirty is cleared.  The next write through the VMM's mapping
 *    faults and sets the dirty bit and soft-dirty again.  A writable entry
 *    that was only read (a read fault on tmpfs maps writable) is reported
 *    once for nothing; after that it is read-only.
 *  - A page with an I/O in flight into it is reported and stays reported
 *    until the I/O is done (see vmsync_walk_clean()).
 *  - A non-present entry that is not empty (migration) is reported.
 *  - A page of a large folio (a huge page of tmpfs with huge= on, mapped
 *    whole or by 4 KiB entries) is reported while its entry is dirty, and
 *    never cleaned: folio_mkclean() would clean every page of the folio,
 *    also those of other slots and those not walked yet.  Never lost, but
 *    such a page is reported at every harvest once written: keep huge
 *    pages off for guest RAM (tmpfs's default).
 *
 * Each step is one test-and-reset under the page table lock, so a write
 * that lands after it is seen by the next harvest; one that landed before
 * is reported now and its bytes are read by the controller after the
 * harvest returns.
 *
 * Not seen: writes through another process's mapping of the file (a
 * vhost-user backend), write(2) to the file, and a page the kernel
 * reclaimed (unmapped) between the write and the harvest, which takes its
 * page table entry along.  vmsync's QEMU has none of the first two; lock
 * guest RAM (QEMU's -overcommit mem-lock=on) where memory runs short.
 * A host page mapped by two slots at different guest addresses is reported
 * under the first slot walked.
 */
#include <linux/hugetlb.h>
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/pgtable.h>
#include <linux/rmap.h>
#include <linux/sched/mm.h>

#include "internal.h"

/* Folios cleaned per batch: collected under the page table lock, cleaned after. */
#define VMSYNC_CLEAN_BATCH	64

struct vmsync_walk {
	struct mm_struct *mm;
	struct vm_area_struct *vma;
	const struct vmsync_slot *slot;
	unsigned long *bitmap;	/* the slot's bits, gfn - base_gfn */
	u64 found;		/* pages marked by this walk */
	u64 busy;		/* pages left reported: an I/O in flight */
	unsigned int n;
	struct page *pages[VMSYNC_CLEAN_BATCH];
	unsigned long addrs[VMSYNC_CLEAN_BATCH];
};

static void vmsync_walk_mark(struct vmsync_walk *w, unsigned long addr,
			     unsigned long end)
{
	unsigned long first = (addr - w->slot->hva) >> PAGE_SHIFT;
	unsigned long count = (end - addr) >> PAGE_SHIFT;
	unsigned long bit;

	for (bit = first; bit < first + count; bit++)
		if (!__test_and_set_bit(bit, w->bitmap))
			w->found++;
}

/*
 * Why guest RAM in @vma cannot be followed (VMSYNC_REFUSED_*), 0 if it can:
 * folio_mkclean() only cleans shared file mappings, hugetlbfs has neither
 * soft-dirty nor a page cache folio_mkclean() walks, and raw PFN mappings
 * have no pages at all.
 */
u32 vmsync_vma_refusal(struct vm_area_struct *vma)
{
	if (is_vm_hugetlb_page(vma))
		return VMSYNC_REFUSED_HUGETLB;
	if (!vma->vm_file || !(vma->vm_flags & VM_SHARED) ||
	    (vma->vm_flags & (VM_PFNMAP | VM_MIXEDMAP | VM_IO)))
		return VMSYNC_REFUSED_RAM_NOT_SHARED;
	return 0;
}

/* Walks the slot's host range; the first refusal found, or 0.  mmap_lock held. */
static u32 vmsync_range_refusal(struct mm_struct *mm, unsigned long start,
				unsigned long end)
{
	struct vm_area_struct *vma;
	unsigned long addr = start;
	u32 why;

	while (addr < end) {
		vma = find_vma(mm, addr);
		if (!vma || vma->vm_start >= end)
			return 0;	/* nothing mapped: nothing written */
		why = vmsync_vma_refusal(vma);
		if (why)
			return why;
		addr = vma->vm_end;
	}
	return 0;
}

u32 vmsync_slot_refusal(struct mm_struct *mm, const struct vmsync_slot *s)
{
	u32 why;

	mmap_read_lock(mm);
	why = vmsync_range_refusal(mm, s->hva, s->hva + (s->npages << PAGE_SHIFT));
	mmap_read_unlock(mm);
	return why;
}

/* The pud entry over @addr, or NULL where no page table reaches that far. */
static pud_t *vmsync_lookup_pud(struct mm_struct *mm, unsigned long addr)
{
	pgd_t *pgd = pgd_offset(mm, addr);
	p4d_t *p4d;
	pud_t *pud;

	if (pgd_none(*pgd) || pgd_bad(*pgd))
		return NULL;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(*p4d) || p4d_bad(*p4d))
		return NULL;
	pud = pud_offset(p4d, addr);
	return pud_none(*pud) ? NULL : pud;
}

/* The locked page table entry for @addr, if a page table maps it. */
static pte_t *vmsync_lookup_pte(struct mm_struct *mm, unsigned long addr,
				spinlock_t **ptl)
{
	pud_t *pud = vmsync_lookup_pud(mm, addr);
	pmd_t *pmd, pmdval;

	if (!pud || pud_bad(*pud))
		return NULL;
	pmd = pmd_offset(pud, addr);
	pmdval = pmd_read_atomic(pmd);
	barrier();
	if (pmd_none(pmdval) || !pmd_present(pmdval) ||
	    pmd_trans_huge(pmdval) || pmd_devmap(pmdval) || pmd_bad(pmdval))
		return NULL;
	return pte_offset_map_lock(mm, pmd, addr, ptl);
}

/*
 * Sets or clears soft-dirty in the VMM's entry for @page at @addr, if it
 * still maps that page; clearing only while it is clean and read-only (the
 * next write then faults or sets the dirty bit).
 */
static void vmsync_set_soft_dirty(struct vmsync_walk *w, struct page *page,
				  unsigned long addr, bool set)
{
	spinlock_t *ptl;
	pte_t *pte = vmsync_lookup_pte(w->mm, addr, &ptl);
	pte_t v, old;

	if (!pte)
		return;
	v = ptep_get(pte);
	if (pte_present(v) && pte_page(v) == page &&
	    (set ? !pte_soft_dirty(v) :
	     (pte_soft_dirty(v) && !pte_write(v) && !pte_dirty(v)))) {
		old = ptep_modify_prot_start(w->vma, addr, pte);
		ptep_modify_prot_commit(w->vma, addr, pte, old,
					set ? pte_mksoft_dirty(old) :
					      pte_clear_soft_dirty(old));
	}
	pte_unmap_unlock(pte, ptl);
}

/*
 * Resets the batch, whose pages were all reported: every mapping of each
 * folio read-only and clean (the folio marked dirty, as writeback does
 * before it cleans), then soft-dirty off.  The folio lock is held
 * throughout, so writeback cannot clean it in between.
 *
 * A folio someone holds beyond the page cache, its mappings and us may be
 * the target of an I/O in flight that writes it after we looked (an
 * O_DIRECT read: get_user_pages() took it while the entry was writable, the
 * device writes it by DMA later).  As KSM does, the references are counted
 * after the entries were cleaned and flushed, so a lockless
 * get_user_pages_fast() either finished before (and is counted) or finds the
 * entry read-only and faults.  Such a folio keeps soft-dirty set, so the
 * next harvest reports it again.  A folio not on the LRU yet is allowed one
 * reference more: the per-CPU batch that will put it there.
 */
static void vmsync_walk_clean(struct vmsync_walk *w)
{
	unsigned int i;

	for (i = 0; i < w->n; i++) {
		struct page *page = w->pages[i];
		struct folio *folio = page_folio(page);
		bool busy;
		int expected;

		folio_lock(folio);
		if (folio->mapping) {	/* else truncated meanwhile */
			if (folio_mkclean(folio))
				folio_mark_dirty(folio);
			expected = page_mapcount(page) + 2 +
				!folio_test_lru(folio);
			busy = folio_ref_count(folio) > expected;
			vmsync_set_soft_dirty(w, page, w->addrs[i], busy);
			w->busy += busy;
		}
		folio_unlock(folio);
		folio_put(folio);
	}
	w->n = 0;
}

static void vmsync_walk_keep(struct vmsync_walk *w, struct page *page,
			     unsigned long addr)
{
	folio_get(page_folio(page));
	w->pages[w->n] = page;
	w->addrs[w->n] = addr;
	w->n++;
}

/* A huge entry: reported while dirty (or under migration), never cleaned. */
static void vmsync_walk_huge(struct vmsync_walk *w, pmd_t *pmd,
			     unsigned long addr, unsigned long end)
{
	spinlock_t *ptl = pmd_lock(w->mm, pmd);
	pmd_t v = *pmd;

	if (!pmd_present(v) || pmd_dirty(v))
		vmsync_walk_mark(w, addr, end);
	spin_unlock(ptl);
}

/* One page table's worth; returns where it stopped (a full batch). */
static unsigned long vmsync_walk_ptes(struct vmsync_walk *w, pmd_t *pmd,
				      unsigned long addr, unsigned long end)
{
	spinlock_t *ptl;
	pte_t *start = pte_offset_map_lock(w->mm, pmd, addr, &ptl);
	pte_t *pte = start;

	for (; addr < end && w->n < VMSYNC_CLEAN_BATCH; addr += PAGE_SIZE,
	     pte++) {
		pte_t v = ptep_get(pte);

		if (pte_none(v))
			continue;
		if (!pte_present(v)) {
			/* Under migration: cannot tell, so report. */
			vmsync_walk_mark(w, addr, addr + PAGE_SIZE);
			continue;
		}
		if (pte_dirty(v) || pte_write(v) || pte_soft_dirty(v)) {
			vmsync_walk_mark(w, addr, addr + PAGE_SIZE);
			if (!pte_special(v) &&
			    !folio_test_large(page_folio(pte_page(v))))
				vmsync_walk_keep(w, pte_page(v), addr);
		}
	}
	pte_unmap_unlock(start, ptl);
	return addr;
}

/* [addr, end) inside one VMA. */
static void vmsync_walk_vma(struct vmsync_walk *w, unsigned long addr,
			    unsigned long end)
{
	while (addr < end) {
		unsigned long next = pmd_addr_end(addr, end);
		pud_t *pud = vmsync_lookup_pud(w->mm, addr);
		pmd_t *pmd, pmdval;

		if (!pud)
			goto skip;
		if (pud_bad(*pud)) {
			/* A huge pud in a shared file mapping: DAX only. */
			vmsync_walk_mark(w, addr, next);
			goto skip;
		}
		pmd = pmd_offset(pud, addr);
		pmdval = pmd_read_atomic(pmd);
		barrier();
		if (pmd_none(pmdval))
			goto skip;
		if (!pmd_present(pmdval) || pmd_trans_huge(pmdval) ||
		    pmd_devmap(pmdval)) {
			vmsync_walk_huge(w, pmd, addr, next);
			goto skip;
		}
		if (pmd_bad(pmdval)) {
			vmsync_walk_mark(w, addr, next);
			goto skip;
		}
		addr = vmsync_walk_ptes(w, pmd, addr, next);
		if (w->n == VMSYNC_CLEAN_BATCH)
			vmsync_walk_clean(w);
		if (addr < next)
			continue;	/* the batch filled: same table again */
skip:
		if (w->n == VMSYNC_CLEAN_BATCH)
			vmsync_walk_clean(w);
		addr = next;
	}
}

/*
 * Adds to @bitmap (bit = gfn - s->base_gfn) every page of slot @s the VMM
 * wrote through its own mapping since the last call, and resets tracking.
 * Returns the pages found that were not in @bitmap yet (adding to @busy
 * those left reported for an I/O in flight), -ENOMEM, or a VMSYNC_REFUSED_*
 * reason as a negative number when part of the slot is no longer a shared
 * file mapping (the caller asks for a rescan).
 */
long vmsync_vmm_writes(struct mm_struct *mm, const struct vmsync_slot *s,
		       unsigned long *bitmap, u64 *busy)
{
	struct vmsync_walk *w = kmalloc(sizeof(*w), GFP_KERNEL);
	unsigned long addr = s->hva, end = s->hva + (s->npages << PAGE_SHIFT);
	long r = 0;

	if (!w)
		return -ENOMEM;
	*w = (struct vmsync_walk){ .mm = mm, .slot = s, .bitmap = bitmap };
	mmap_read_lock(mm);
	while (addr < end) {
		struct vm_area_struct *vma = find_vma(mm, addr);
		unsigned long stop;
		u32 why;

		if (!vma || vma->vm_start >= end)
			break;
		addr = max(addr, vma->vm_start);
		stop = min(end, vma->vm_end);
		why = vmsync_vma_refusal(vma);
		if (why) {
			r = -(long)why;
			break;
		}
		w->vma = vma;
		vmsync_walk_vma(w, addr, stop);
		vmsync_walk_clean(w);
		addr = stop;
	}
	mmap_read_unlock(mm);
	*busy += w->busy;
	if (!r)
		r = w->found;
	kfree(w);
	return r;
}
