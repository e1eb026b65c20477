//! Images (issue 26): named sets of snapshots that pin them, deployed as volumes many times
//! over, exported to raw, qcow2, vmdk and vhdx files (compared with `qemu-img compare`
//! against the snapshots) and imported back.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::store::*;
use common::{ok, Daemon};

/// A daemon with volumes `root` (16 MiB: 1 MiB of data at 0, 64 KiB at 8 MiB, holes between)
/// and `data` (8 MiB: 512 KiB at 1 MiB), their snapshots `s1`, and image `web` of them; the
/// snapshots' content in `TMP/root.raw` and `TMP/data.raw`.
fn setup(tmp: &Path) -> Daemon {
    let d = Daemon::start(&tmp.join("d"));
    d.cli_ok(&["volume", "create", "root", "--size", "16M"]);
    d.cli_ok(&["volume", "create", "data", "--size", "8M"]);
    fill(&d, "root", 0, MIB, 1);
    fill(&d, "root", 8 * MIB, 64 << 10, 2);
    fill(&d, "data", MIB, 512 << 10, 3);
    for v in ["root", "data"] {
        snapshot(&d, v, "s1");
        nbd_to_file(&d, &format!("{v}@s1"), &tmp.join(format!("{v}.raw")));
    }
    let image =
        d.cli_json(&["image", "create", "web", "--root", "root@s1", "--data", "data@s1", "--description", "web tier"]);
    let disks: Vec<(&str, &str)> = image["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["snapshot"].as_str().unwrap()))
        .collect();
    assert_eq!(disks, [("root", "root@s1"), ("data1", "data@s1")], "{image}");
    d
}

#[test]
fn an_image_pins_its_snapshots_and_deploys_many_times() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = setup(tmp.path());
    for i in 1..=3 {
        let made = d.cli_json(&["volume", "create-from-image", "web", "--prefix", &format!("web{i}-")]);
        assert_eq!(made.as_array().unwrap().len(), 2, "{made}");
        for (disk, source) in [("root", "root"), ("data1", "data")] {
            let got = tmp.path().join("got.raw");
            nbd_to_file(&d, &format!("web{i}-{disk}"), &got);
            compare(&tmp.path().join(format!("{source}.raw")), &got);
        }
    }
    // A prefix whose names are taken: nothing made.
    let (code, err) = d.cli_err(&["volume", "create-from-image", "web", "--prefix", "web2-"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("web2-root") && err.contains("--prefix"), "{err}");
    // Pinned: the snapshots cannot be deleted while the image exists (naming it).
    let (code, err) = d.cli_err(&["snapshot", "delete", "data@s1"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("image(s) web") && err.contains("snapblk image delete web"), "{err}");
    common::assert_one_sentence(&err);
    // From a group snapshot: its members, the first the root.
    d.cli_ok(&["group", "create", "g", "root", "data"]);
    d.cli_ok(&["group", "snapshot", "g", "--name", "gs"]);
    let from_group = d.cli_json(&["image", "create", "web-g", "--from-group", "g@gs"]);
    let disks: Vec<&str> =
        from_group["disks"].as_array().unwrap().iter().map(|x| x["snapshot"].as_str().unwrap()).collect();
    assert_eq!(disks, ["root@gs", "data@gs"], "{from_group}");
    d.cli_ok(&["image", "delete", "web-g"]);
    let listed = d.cli_json(&["image", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    d.cli_ok(&["image", "delete", "web"]);
    let (code, _) = d.cli_err(&["image", "show", "web"]);
    assert_eq!(code, 4);
    // No longer pinned.
    d.cli_ok(&["snapshot", "delete", "data@s1"]);
}

#[test]
fn an_image_exports_to_every_format_and_imports_back() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = setup(tmp.path());
    for format in ["raw", "qcow2", "vmdk", "vhdx"] {
        let out = tmp.path().join(format!("export-{format}"));
        let manifest =
            d.cli_json(&["image", "export", "web", "--output", &out.display().to_string(), "--format", format]);
        let on_disk: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest, on_disk, "the job's result is manifest.json");
        for (disk, source, size) in [("root", "root", 16 * MIB), ("data1", "data", 8 * MIB)] {
            let file = out.join(format!("{disk}.{format}"));
            ok(
                "qemu-img",
                &[
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    "-F",
                    format,
                    &tmp.path().join(format!("{source}.raw")).display().to_string(),
                    &file.display().to_string(),
                ],
            );
            let entry = manifest["disks"].as_array().unwrap().iter().find(|x| x["disk"] == disk).unwrap();
            assert_eq!(entry["size"].as_u64(), Some(size), "{manifest}");
            let sum = ok("sha256sum", &[&file.display().to_string()]);
            assert_eq!(entry["sha256"].as_str(), sum.split_whitespace().next(), "{format} {disk}");
            if format == "raw" {
                // Sparse: the holes were not written (16 MiB disk, about 1 MiB of data).
                let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
                assert!(allocated < 4 * MIB, "{disk}.raw allocates {allocated} bytes");
            }
        }
        // Imported back: volumes, snapshots and an image whose disks hold the same data.
        let name = format!("back-{format}");
        let back = d.cli_json(&[
            "image",
            "import",
            &name,
            "--root",
            &out.join(format!("root.{format}")).display().to_string(),
            "--data",
            &out.join(format!("data1.{format}")).display().to_string(),
        ]);
        for (i, source) in ["root", "data"].iter().enumerate() {
            let snap = back["disks"][i]["snapshot"].as_str().unwrap().to_string();
            let got = tmp.path().join("back.raw");
            nbd_to_file(&d, &snap, &got);
            compare(&tmp.path().join(format!("{source}.raw")), &got);
        }
        // Exporting again over an earlier export needs --force.
        let (code, err) =
            d.cli_err(&["image", "export", "web", "--output", &out.display().to_string(), "--format", format]);
        assert_ne!(code, 0, "{err}");
        assert!(err.contains("--force"), "{err}");
    }
    // A file that is not there: a sentence, nothing made.
    let (code, err) = d.cli_err(&["image", "import", "nothing", "--root", "/nonexistent/disk.qcow2"]);
    assert_eq!(code, 2, "{err}");
}
