//! The peer figure for upload and restore benchmarks: raw parallel PUTs (then GETs) of the
//! same number of bytes (random, no two objects alike) to the same region, straight through
//! `object_store`, without snapblk's format, crypto or layers. Used by scripts/bench.
//!
//!   store_peer DIR REGION BYTES OBJECT_SIZE CONCURRENCY
//!   store_peer DIR REGION get PREFIX CONCURRENCY
//!
//! Reads DIR/snapblk.toml for the region. The first form writes BYTES of random data as
//! OBJECT_SIZE objects under `peer-<random>/`, reads them back, deletes them, and prints
//! `{"bytes": N, "put_secs": S, "get_secs": S}`; on a filesystem region each object is fsynced
//! after its PUT, as snapblk does. The second GETs every object already under PREFIX (e.g. a
//! snapshot's `packs/`, for the hydration figure) and prints `{"bytes": N, "get_secs": S}`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use snapblk::store::config::{Backend, Config};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, region, a, b, concurrency] = args.as_slice() else {
        anyhow::bail!(
            "usage: store_peer DIR REGION BYTES OBJECT_SIZE CONCURRENCY | store_peer DIR REGION get PREFIX CONCURRENCY"
        );
    };
    let dir = std::path::Path::new(dir);
    let concurrency: usize = concurrency.parse()?;
    let cfg = Config::parse(&std::fs::read_to_string(dir.join("snapblk.toml"))?, dir).map_err(anyhow::Error::msg)?;
    let rc = cfg.regions.get(region).ok_or_else(|| anyhow::anyhow!("no region {region}"))?;
    let (store, fs_root): (Arc<dyn ObjectStore>, _) = match &rc.backend {
        Backend::Fs { path } => {
            std::fs::create_dir_all(path)?;
            (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(path)?), Some(path.clone()))
        }
        Backend::S3 { endpoint, bucket, prefix, region, access_key_id, secret_access_key } => {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(region)
                .with_access_key_id(access_key_id)
                .with_secret_access_key(secret_access_key);
            if let Some(ep) = endpoint {
                b = b.with_endpoint(ep).with_allow_http(true);
            }
            let s3 = b.build()?;
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.trim_end_matches('/')))
            };
            (store, None)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if a == "get" {
        return rt.block_on(get_existing(store, b, concurrency));
    }
    let (bytes, object_size): (u64, u64) = (a.parse()?, b.parse()?);
    let prefix = format!("peer-{:016x}", rand::random::<u64>());
    let count = bytes.div_ceil(object_size);
    // Every object holds different bytes (each starts 4 KiB further into one random buffer):
    // Garage stores identical 1 MiB blocks once, so PUTting one payload again and again
    // would measure its deduplication, not its ingest. snapblk's packs never repeat.
    let stride = 4096usize;
    let mut payload = vec![0u8; object_size as usize + count as usize * stride];
    rand::Rng::fill(&mut rand::thread_rng(), payload.as_mut_slice());
    let payload = bytes::Bytes::from(payload);
    rt.block_on(async {
        let key = |i: u64| ObjPath::from(format!("{prefix}/{i:08}"));
        let t = Instant::now();
        let puts = futures::stream::iter(0..count)
            .map(|i| {
                let data = payload.slice(i as usize * stride..i as usize * stride + object_size as usize);
                let (store, fs_root, key) = (store.clone(), fs_root.clone(), key(i));
                async move {
                    store.put(&key, data.into()).await?;
                    if let Some(root) = fs_root {
                        let file = root.join(key.to_string());
                        tokio::task::spawn_blocking(move || std::fs::File::open(file)?.sync_all()).await??;
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        puts.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let put_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let gets = futures::stream::iter(0..count)
            .map(|i| {
                let (store, key) = (store.clone(), key(i));
                async move { anyhow::Ok(store.get(&key).await?.bytes().await?.len()) }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        let got: usize = gets.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().sum();
        let get_secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(got as u64 == count * object_size, "read back {got} bytes");
        for i in 0..count {
            store.delete(&key(i)).await?;
        }
        println!("{}", serde_json::json!({ "bytes": count * object_size, "put_secs": put_secs, "get_secs": get_secs }));
        anyhow::Ok(())
    })
}

/// GETs every object under `prefix`, `concurrency` at a time.
async fn get_existing(store: Arc<dyn ObjectStore>, prefix: &str, concurrency: usize) -> anyhow::Result<()> {
    let keys: Vec<ObjPath> = store
        .list(Some(&ObjPath::from(prefix)))
        .map(|m| m.map(|m| m.location))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let gets = futures::stream::iter(keys)
        .map(|key| {
            let store = store.clone();
            async move { anyhow::Ok(store.get(&key).await?.bytes().await?.len() as u64) }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let got: u64 = gets.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().sum();
    println!("{}", serde_json::json!({ "bytes": got, "get_secs": t.elapsed().as_secs_f64() }));
    Ok(())
}
