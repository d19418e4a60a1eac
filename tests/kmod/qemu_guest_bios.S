/*
 * A 64 KiB "BIOS" for QEMU, the guest of kmod_qemu_check: in real mode it
 * writes a round counter into the first byte of every even page from
 * 0x10000 up to 0x90000 (64 pages), round after round; odd pages there
 * are never written.  Built with as + objcopy -O binary by run_kmod_test.sh.
 */
	.code16
	.text
start:				/* 0xf0000: the reset vector jumps here */
	cli
	xor	%bl, %bl
round:
	inc	%bl
	mov	$0x1000, %ax
page:
	mov	%ax, %es
	movb	%bl, %es:0
	add	$0x200, %ax
	cmp	$0x9000, %ax
	jb	page
	jmp	round
	.org	0xfff0		/* the reset vector, 16 bytes below 4 GiB */
reset:
	ljmp	$0xf000, $start
	.org	0x10000
