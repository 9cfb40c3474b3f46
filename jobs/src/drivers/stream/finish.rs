//! The stream's final graph change (its `prepare`): the new backing in the
//! header and in memory, then the release of the images it no longer needs.

use super::StreamPlan;
use bdev::device::Device;
use graph::node;

/// Commits the new backing: header first, then the in-memory link, with
/// the device quiesced so no request is traversing the chain meanwhile; then
/// releases the images between top and base that nothing else uses.
pub(super) async fn change_backing(plan: &StreamPlan) -> Result<(), String> {
    let Some(top) = plan.top.clone() else {
        return Ok(());
    };
    if plan.noop {
        // Nothing was copied and the chain stays, but QEMU's stream_prepare
        // still records the base's name (as QEMU gives it) in the header.
        if plan.base.is_some() {
            top.set_backing_file(
                plan.backing_file.as_deref(),
                plan.backing_format.as_deref(),
                plan.durable,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let rt = reactor::handle().ok_or_else(|| "not on a reactor".to_string())?;
    let dev = plan.device.as_ref().and_then(Device::from_bdev);
    if let Some(d) = dev {
        d.quiesce(&rt).await.map_err(|e| e.to_string())?;
    }
    let r = async {
        top.set_backing_file(
            plan.backing_file.as_deref(),
            plan.backing_format.as_deref(),
            plan.durable,
        )
        .await?;
        top.set_backing_bdev(plan.base.clone()).await
    }
    .await;
    if let Some(d) = dev {
        d.resume(&rt).await;
    }
    r.map_err(|e| e.to_string())?;
    // Claims moved with the link (the top let go of its old backing and
    // claims the base). Going down, each image nothing claims any more is
    // released, and lets go of what is below it in turn.
    for b in &plan.intermediates {
        let name = b.name();
        let g = &plan.graph;
        if g.nodes().contains(name) && g.nodes().claims(name).is_empty() {
            if let Ok(b) = g.unregister_from_reactor(name).await {
                if let Some(img) = node::image(&b) {
                    if let Err(e) = img.set_backing_bdev(None).await {
                        tracing::warn!(node = name, error = %e, "cannot unlink released image");
                    }
                }
                // Trim the file its open extended (after a flush, for a durable job).
                if let Some(q) = b.as_any().downcast_ref::<bdev::qcow2::Qcow2Bdev>() {
                    let r = if plan.durable {
                        q.close().await
                    } else {
                        q.trim_file().await
                    };
                    if let Err(e) = r {
                        tracing::warn!(node = name, error = %e, "cannot close released image");
                    }
                }
                b.on_delete();
                tracing::info!(node = name, "intermediate image released after stream");
            }
        }
    }
    Ok(())
}
