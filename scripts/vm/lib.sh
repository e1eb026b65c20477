# Shared by scripts/vm-test and scripts/vm/power-loss (sourced, not run): the guest kernel
# (Debian's bookworm-backports 6.12 package, downloaded once) with its modules, and helpers to
# build an initramfs. Downloads and extracted modules are cached in
# ${SNAPBLK_CACHE:-$HOME/.cache/snapblk}/vm and reused.
#
# Callers set `vm_name` (the prefix of messages) and `repo`, then call vm_kernel, which sets
# `kver` and `kdir` ($kdir/vmlinuz, $kdir/modules/*.ko and $kdir/modules/order).

vm_cache=${SNAPBLK_CACHE:-$HOME/.cache/snapblk}/vm
# Every module any VM test needs, with their dependencies: one extraction serves them all.
vm_modules="crc32c_generic ext4 nbd ublk_drv virtio_blk"

die() {
    echo "$vm_name: $*" >&2
    exit 1
}

vm_require() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not installed (scripts/test installs what this needs)"
    done
}

vm_busybox() {
    busybox_bin=$(command -v busybox) || die "busybox is not installed (scripts/test installs busybox-static)"
    # (ldd fails on a static binary: read its answer, not its exit status)
    grep -q 'not a dynamic executable' <<<"$(ldd "$busybox_bin" 2>&1 || true)" ||
        die "$busybox_bin is not statically linked; install busybox-static"
}

vm_kernel_package() {
    apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-6\.12/ {print $2; exit}' || true
}

vm_kernel() {
    mkdir -p "$vm_cache"
    local pkg="" deb
    if command -v apt-cache >/dev/null; then
        pkg=$(vm_kernel_package)
        if [ -z "$pkg" ] && ! ls "$vm_cache"/linux-image-6.12*.deb >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq || true # the backports suite may be new
            pkg=$(vm_kernel_package)
        fi
    fi
    if [ -n "$pkg" ]; then
        deb=$(ls "$vm_cache"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        if [ -z "$deb" ]; then
            echo "$vm_name: downloading $pkg (about 106 MB, once)"
            (cd "$vm_cache" && apt-get download -t bookworm-backports "$pkg" >/dev/null 2>&1) ||
                die "cannot download $pkg (is bookworm-backports in the apt sources? scripts/test adds it)"
            deb=$(ls "$vm_cache"/"${pkg}"_*.deb | head -n1)
            # Older kernels are not needed any more.
            for old in "$vm_cache"/linux-image-*.deb; do
                [ "$old" = "$deb" ] || rm -f "$old"
            done
            for old in "$vm_cache"/kernel-*; do
                [ "$old" = "$vm_cache/kernel-${pkg#linux-image-}" ] || rm -rf "$old"
            done
        fi
    else
        # No apt metadata: use what an earlier run cached.
        deb=$(ls -t "$vm_cache"/linux-image-6.12*.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "no kernel package: add bookworm-backports to the apt sources (scripts/test does)"
        pkg=$(basename "$deb" | sed 's/_.*//')
    fi
    kver=${pkg#linux-image-}
    kdir=$vm_cache/kernel-$kver
    # An extraction made for another module list is redone (the .deb is cached).
    if [ ! -f "$kdir/ready" ] || [ "$(cat "$kdir/ready")" != "$vm_modules" ]; then
        echo "$vm_name: extracting $kver (once)"
        rm -rf "$kdir" "$kdir.tmp"
        mkdir -p "$kdir.tmp/x" "$kdir.tmp/modules"
        dpkg-deb -x "$deb" "$kdir.tmp/x"
        local root=$kdir.tmp/x
        [ -d "$root/lib/modules/$kver" ] || root=$kdir.tmp/x/usr
        [ -d "$root/lib/modules/$kver" ] || die "no lib/modules/$kver in $deb"
        cp "$kdir.tmp/x/boot/vmlinuz-$kver" "$kdir.tmp/vmlinuz"
        depmod -b "$root" "$kver"
        : >"$kdir.tmp/modules/order"
        for m in $vm_modules; do
            modprobe -d "$root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
        done | awk '!seen[$0]++' | while read -r ko; do
            name=$(basename "$ko")
            name=${name%.xz}
            name=${name%.ko}
            case "$ko" in
                *.xz) xz -dc "$ko" >"$kdir.tmp/modules/$name.ko" ;;
                *) cp "$ko" "$kdir.tmp/modules/$name.ko" ;;
            esac
            echo "$name" >>"$kdir.tmp/modules/order"
        done
        rm -rf "$kdir.tmp/x"
        echo "$vm_modules" >"$kdir.tmp/ready"
        mv "$kdir.tmp" "$kdir"
    fi
    echo "$vm_name: kernel $kver, modules: $(tr '\n' ' ' <"$kdir/modules/order")"
}

# vm_rootfs DIR: a root with busybox, the folders init expects and every module.
vm_rootfs() {
    rootfs=$1
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,modules,data}
    cp "$busybox_bin" "$rootfs/bin/busybox"
    cp "$kdir"/modules/*.ko "$kdir/modules/order" "$rootfs/modules/"
}

# Copies a program into $rootfs and the libraries it links to, keeping their paths.
add_program() {
    local src=$1 dst=$2
    cp -L "$src" "$rootfs$dst"
    ldd "$src" 2>/dev/null | awk '/=> \// {print $3} /^[ \t]*\/[^ ]+ \(/ {print $1}' | while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        [ -e "$rootfs$lib" ] || cp -L "$lib" "$rootfs$lib"
    done
}

# vm_initrd INIT OUT: $rootfs with INIT as /init, packed as a newc cpio.
vm_initrd() {
    cp "$1" "$rootfs/init"
    chmod +x "$rootfs/init"
    (cd "$rootfs" && find . | cpio -o -H newc --quiet) >"$2"
    echo "$vm_name: initramfs $(du -h "$2" | cut -f1)"
}
