//! Finding the cells' libstd (`libstd-*.so`, loaded with the first cell) and, in its dynamic
//! symbol table, `std::panic::resume_unwind` and the global panic count.

use super::Object;

/// `std::panic::resume_unwind` and `GLOBAL_PANIC_COUNT` in the loaded `libstd-*.so`, as addresses.
pub(super) fn find_libstd(objects: &[Object]) -> Option<(usize, usize)> {
    let std_obj = objects.iter().find(|o| {
        let file = o.name.rsplit('/').next().unwrap_or("");
        file.starts_with("libstd-") && file.ends_with(".so")
    })?;
    let [resume, count] = dynamic_symbols(std::path::Path::new(&std_obj.name), [is_resume_unwind, is_global_panic_count]);
    Some((std_obj.base + resume? as usize, std_obj.base + count? as usize))
}

/// The mangled names of `std::panic::resume_unwind` (v0 and legacy mangling).
fn is_resume_unwind(name: &[u8]) -> bool {
    (name.starts_with(b"_RNvNtCs") && name.ends_with(b"_3std5panic13resume_unwind")) || name.starts_with(b"_ZN3std5panic13resume_unwind17h")
}

/// The mangled names of `std::panicking::panic_count::GLOBAL_PANIC_COUNT`.
fn is_global_panic_count(name: &[u8]) -> bool {
    (name.starts_with(b"_RNvNtNtCs") && name.ends_with(b"_3std9panicking11panic_count18GLOBAL_PANIC_COUNT"))
        || name.starts_with(b"_ZN3std9panicking11panic_count18GLOBAL_PANIC_COUNT17h")
}

/// The values of the first defined dynamic symbols of an ELF64 little-endian file whose names
/// satisfy each of `wants`.
fn dynamic_symbols<const N: usize>(path: &std::path::Path, wants: [fn(&[u8]) -> bool; N]) -> [Option<u64>; N] {
    let mut found = [None; N];
    if let Ok(data) = std::fs::read(path) {
        let _ = scan_dynsym(&data, &wants, &mut found);
    }
    found
}

fn scan_dynsym<const N: usize>(data: &[u8], wants: &[fn(&[u8]) -> bool; N], found: &mut [Option<u64>; N]) -> Option<()> {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes(b.try_into().expect("2")));
    let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4")));
    let u64_at = |o: usize| data.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8")));
    if data.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        if u32_at(sh + 4)? != 11 {
            continue; // not SHT_DYNSYM
        }
        let (off, size, link, entsize) =
            (u64_at(sh + 0x18)? as usize, u64_at(sh + 0x20)? as usize, u32_at(sh + 0x28)? as usize, u64_at(sh + 0x38)? as usize);
        let strsh = shoff + link * shentsize;
        let (stroff, strsize) = (u64_at(strsh + 0x18)? as usize, u64_at(strsh + 0x20)? as usize);
        let strtab = data.get(stroff..stroff + strsize)?;
        let entsize = if entsize == 0 { 24 } else { entsize };
        for s in (off..off + size).step_by(entsize) {
            let name_off = u32_at(s)? as usize;
            let shndx = u16_at(s + 6)?;
            let value = u64_at(s + 8)?;
            if shndx == 0 || value == 0 {
                continue;
            }
            let name = strtab.get(name_off..)?;
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            for (w, f) in wants.iter().zip(found.iter_mut()) {
                if f.is_none() && w(name) {
                    *f = Some(value);
                }
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libstd_names() {
        assert!(is_resume_unwind(b"_RNvNtCsjrHSEGnQ3l9_3std5panic13resume_unwind"));
        assert!(is_resume_unwind(b"_ZN3std5panic13resume_unwind17h0123456789abcdefE"));
        assert!(!is_resume_unwind(
            b"_RNvXNvNtCsjrHSEGnQ3l9_3std9panicking13resume_unwindNtB2_9RewrapBoxNtNtCsgEmfK2I1SDS_4core5panic12PanicPayload8take_box"
        ));
        assert!(is_global_panic_count(b"_RNvNtNtCsjrHSEGnQ3l9_3std9panicking11panic_count18GLOBAL_PANIC_COUNT"));
        assert!(!is_global_panic_count(b"_RNvNtNtCsjrHSEGnQ3l9_3std9panicking11panic_count8increase"));
    }

    #[test]
    fn the_toolchains_libstd_has_both_symbols() {
        let Ok(out) = std::process::Command::new("rustc").args(["--print", "target-libdir"]).output() else { return };
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let Some(lib) = std::fs::read_dir(&dir).ok().and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libstd-") && n.to_string_lossy().ends_with(".so")))
        }) else {
            return;
        };
        let [a, b] = dynamic_symbols(&lib, [is_resume_unwind, is_global_panic_count]);
        assert!(a.is_some() && b.is_some(), "{lib:?}: {a:?} {b:?}");
    }
}
