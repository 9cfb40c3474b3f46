//! Claims: a bdev used by a layer above cannot be deleted underneath it.

use bdev::error_bdev::ErrorBdev;
use bdev::null::NullBdev;
use bdev::{channel, read_at, BdevError};
use reactor::{CoreSet, Runtime, RuntimeConfig};

/// This test process's registry (the graph hands one down in the service).
fn registry() -> &'static std::sync::Arc<bdev::Registry> {
    static R: std::sync::OnceLock<std::sync::Arc<bdev::Registry>> = std::sync::OnceLock::new();
    R.get_or_init(bdev::Registry::new)
}

#[test]
fn claimed_bdev_cannot_be_deleted_until_released() {
    let rt = Runtime::start(RuntimeConfig {
        pin: false,
        ..RuntimeConfig::new(CoreSet::from_list("0").unwrap())
    })
    .unwrap();
    let h = rt.handle();
    registry()
        .register(NullBdev::new("claim_base", 64, 512, None).unwrap())
        .unwrap();
    registry()
        .register(ErrorBdev::new(registry(), "claim_base").unwrap())
        .unwrap();
    assert_eq!(
        registry().claims("claim_base"),
        vec!["EE_claim_base".to_string()]
    );
    // Use both so each reactor has channels cached.
    h.spawn_on(0, || async {
        let e = registry().get("EE_claim_base").unwrap();
        let ch = channel(&e).unwrap();
        read_at(&ch, 0, 512).await.unwrap();
    })
    .block()
    .unwrap();
    let err = registry().delete("claim_base", &h).unwrap_err();
    assert!(matches!(err, BdevError::Claimed { .. }));
    assert_eq!(
        err.to_string(),
        "bdev \"claim_base\" is in use by EE_claim_base"
    );
    assert!(
        registry().contains("claim_base"),
        "still there after the refused delete"
    );
    // Deleting the top releases its claim (on_delete), then the base can go.
    registry().delete("EE_claim_base", &h).unwrap();
    assert!(registry().claims("claim_base").is_empty());
    registry().delete("claim_base", &h).unwrap();
    assert!(!registry().contains("claim_base"));
    assert!(matches!(
        registry().delete("claim_base", &h),
        Err(BdevError::NotFound(_))
    ));
}
