//! `Tensor`: a copyable handle to a ggml tensor that cannot outlive its context: shape, strides, type, name, and
//! length-checked data transfer to and from its backend buffer.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::devices::DeviceBackend;
use super::error::{GgmlError, Result};
use super::region::is_read_only;
use super::types::{cstr_lossy, from_ggml};

/// Longest tensor name ggml stores (`GGML_MAX_NAME` - 1 bytes plus NUL).
pub const MAX_NAME_LEN: usize = 63;

/// A handle to a tensor of a [`super::Context`]; `'ctx` borrows that context (and every context its sources live
/// in), so the handle cannot outlive the metadata or the data buffers.
///
/// Deliberately not `PartialEq` (that would make `t.ne()` on a `&Tensor` resolve to `PartialEq::ne`); compare
/// handles with [`Tensor::same_as`].
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx ()>,
}

impl<'ctx> Tensor<'ctx> {
    /// # Safety
    /// `ptr` must be NULL or a tensor of a context (and sources) that outlive `'ctx`.
    pub(super) unsafe fn from_raw(ptr: *mut sys::ggml_tensor) -> Option<Tensor<'ctx>> {
        NonNull::new(ptr).map(|ptr| Tensor {
            ptr,
            _ctx: PhantomData,
        })
    }

    pub(super) fn as_ptr(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    /// True when both handles name the same ggml tensor.
    pub fn same_as(self, other: Tensor<'_>) -> bool {
        self.ptr == other.ptr
    }

    /// A copy of the C struct (fields only; the pointers in it are not followed here).
    fn raw(self) -> sys::ggml_tensor {
        // SAFETY: the tensor is alive for 'ctx; ggml_tensor is plain old data and no one writes it concurrently
        // (handles are !Send and graph compute does not touch tensor structs).
        unsafe { std::ptr::read(self.as_ptr()) }
    }

    /// Extents in ggml order `{ne0, ne1, ne2, ne3}` (`ne0` fastest); unused dims are 1.
    pub fn ne(self) -> [i64; 4] {
        self.raw().ne
    }

    /// Strides in bytes, `nb[0]` being the size of one element (or block).
    pub fn nb(self) -> [usize; 4] {
        self.raw().nb
    }

    /// Number of dims up to the last extent > 1 (at least 1), as `ggml_n_dims`.
    pub fn n_dims(self) -> usize {
        // SAFETY: the tensor is alive; ggml_n_dims only reads `ne`.
        unsafe { sys::ggml_n_dims(self.as_ptr()) as usize }
    }

    /// The tensor's type; `None` only for a type id unknown to `gguf::GgmlType` (not produced by this module).
    pub fn ty(self) -> Option<GgmlType> {
        from_ggml(self.raw().type_).ok()
    }

    /// The raw ggml type id.
    pub fn ty_id(self) -> u32 {
        self.raw().type_
    }

    pub(super) fn op(self) -> sys::ggml_op {
        self.raw().op
    }

    /// The operator's name as ggml prints it (`MUL_MAT`, `DSV4_HC_PRE`, `SILU` for unary ops, `NONE` for leafs).
    pub fn op_name(self) -> String {
        // SAFETY: a live tensor; returns a static string naming its op (or unary/glu op).
        cstr_lossy(unsafe { sys::ggml_op_desc(self.as_ptr()) })
    }

    pub(super) fn op_params(self) -> [i32; 16] {
        self.raw().op_params
    }

    /// Total elements.
    pub fn n_elements(self) -> i64 {
        // SAFETY: the tensor is alive; ggml_nelements only reads `ne`.
        unsafe { sys::ggml_nelements(self.as_ptr()) }
    }

    /// Bytes spanned by the tensor (`ggml_nbytes`).
    pub fn n_bytes(self) -> usize {
        // SAFETY: the tensor is alive; ggml_nbytes only reads `ne`, `nb` and the type table.
        unsafe { sys::ggml_nbytes(self.as_ptr()) }
    }

    /// True when rows and planes follow each other without gaps (`ggml_is_contiguous`).
    pub fn is_contiguous(self) -> bool {
        // SAFETY: reads `ne`, `nb` and the type table of a live tensor.
        unsafe { sys::ggml_is_contiguous(self.as_ptr()) }
    }

    /// True when the tensor has data (allocated, bound to a region, or a view of such a tensor).
    pub fn is_allocated(self) -> bool {
        !self.raw().data.is_null()
    }

    /// Address of the first byte of data (NULL when unallocated). For checks such as "no copy was made".
    pub fn data_ptr(self) -> *const u8 {
        self.raw().data as *const u8
    }

    /// The tensor's name ("" when unnamed).
    pub fn name(self) -> String {
        // SAFETY: the tensor is alive and `name` is a NUL-terminated array inside it (ggml always terminates it).
        cstr_lossy(unsafe { sys::ggml_get_name(self.as_ptr()) })
    }

    /// Sets the name (at most [`MAX_NAME_LEN`] bytes, no NUL); ggml shows it in logs and graph dumps.
    pub fn set_name(self, name: &str) -> Result<()> {
        if name.len() > MAX_NAME_LEN {
            return Err(GgmlError::Name {
                name: name.into(),
                detail: "longer than 63 bytes",
            });
        }
        let c = CString::new(name).map_err(|_| GgmlError::Name {
            name: name.into(),
            detail: "contains NUL",
        })?;
        // SAFETY: the tensor is alive, `c` fits the 64-byte name field and ggml copies it.
        unsafe { sys::ggml_set_name(self.as_ptr(), c.as_ptr()) };
        Ok(())
    }

    /// Marks the tensor as a graph input (`ggml_set_input`): the [`super::GraphAllocator`] places inputs before any
    /// computed tensor so that values written after `alloc` survive until compute reads them. Leaf tensors (made
    /// with `new_tensor*`) already get their own memory, so this is only needed for inputs that are graph nodes.
    pub fn set_input(self) {
        // SAFETY: the tensor is alive; the call only sets a flag bit.
        unsafe { sys::ggml_set_input(self.as_ptr()) }
    }

    /// Marks the tensor as a graph output (`ggml_set_output`): the [`super::GraphAllocator`] never frees or reuses
    /// its memory within the graph. Needed for every tensor read after compute that other nodes also consume
    /// (final nodes, with no consumers, are never overwritten).
    pub fn set_output(self) {
        // SAFETY: the tensor is alive; the call only sets a flag bit.
        unsafe { sys::ggml_set_output(self.as_ptr()) }
    }

    /// Sets the byte stride of dimension `dim` (1..=3) of a tensor that has no data yet, and recomputes the strides
    /// above it (a stack of matrices spaced wider than they are long, as in the expert pool).
    pub(super) fn set_strides(self, dim: usize, nb: usize) {
        debug_assert!((1..4).contains(&dim) && !self.is_allocated());
        // SAFETY: the tensor is alive and has no data yet, so no computation reads its strides; ggml_tensor is
        // plain data owned by the context, which handles borrow.
        unsafe {
            let t = &mut *self.as_ptr();
            t.nb[dim] = nb;
            for i in dim + 1..4 {
                t.nb[i] = t.nb[i - 1] * t.ne[i - 1] as usize;
            }
        }
    }

    /// Name for error messages.
    pub(super) fn label(self) -> String {
        let name = self.name();
        if name.is_empty() {
            format!("<unnamed {:?}>", self.ne())
        } else {
            name
        }
    }

    /// True when this tensor is a view of another's memory.
    pub fn is_view(self) -> bool {
        self.view_source().is_some()
    }

    /// The tensor whose memory this one views, if it is a view.
    pub(super) fn view_source(self) -> Option<Tensor<'ctx>> {
        // SAFETY: a view's source outlives it: views are only made by this module's operators, whose results
        // borrow the sources' contexts.
        unsafe { Tensor::from_raw(self.raw().view_src) }
    }

    /// Byte offset of a view inside its source's memory (0 for non-views).
    pub(super) fn view_offs(self) -> usize {
        self.raw().view_offs
    }

    /// The buffer holding the data (a view's is its source's), or NULL.
    pub(super) fn buffer(self) -> sys::ggml_backend_buffer_t {
        match self.view_source() {
            Some(src) => src.raw().buffer,
            None => self.raw().buffer,
        }
    }

    /// Points a view at its source's buffer when the source has data and the view has no buffer yet.
    pub(super) fn init_view_if_needed(self) -> Result<()> {
        let (raw, Some(src)) = (self.raw(), self.view_source()) else {
            return Ok(());
        };
        let src_raw = src.raw();
        if !raw.buffer.is_null() || src_raw.buffer.is_null() || src_raw.data.is_null() {
            return Ok(());
        }
        // SAFETY: the preconditions ggml asserts hold (view without buffer, source with buffer and data); the view's
        // offset was bounds-checked when it was created.
        let status = unsafe { sys::ggml_backend_view_init(self.as_ptr()) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(GgmlError::Alloc {
                what: format!("view '{}' (status {status})", self.label()),
            });
        }
        Ok(())
    }

    /// Checks a transfer of `bytes` bytes of `want` (if given) into or out of this tensor.
    fn check_io(self, bytes: usize, want: Option<GgmlType>, write: bool) -> Result<()> {
        self.check_io_at(None, bytes, want, write)
    }

    /// [`Self::check_io`] of the whole tensor (`offset` `None`) or of `bytes` bytes from `offset`.
    fn check_io_at(
        self,
        offset: Option<usize>,
        bytes: usize,
        want: Option<GgmlType>,
        write: bool,
    ) -> Result<()> {
        let data_err = |detail: String| GgmlError::Data {
            tensor: self.label(),
            detail,
        };
        if !self.is_allocated() || self.buffer().is_null() {
            return Err(GgmlError::Unallocated {
                tensor: self.label(),
            });
        }
        // SAFETY: a live buffer (checked non-null above); the call asks its type.
        let host = unsafe { sys::ggml_backend_buffer_is_host(self.buffer()) };
        if !host && super::repack::RepackType::holds(self.buffer()) {
            // ggml's repacked layouts (CPU_REPACK, AMX) have no way back (the buffer has no get_tensor) and are
            // written once.
            return Err(data_err(
                "is held in ggml's repacked CPU layout, which cannot be read or written".into(),
            ));
        }
        if !self.is_contiguous() {
            return Err(data_err(
                "is not contiguous; copy it with cont() first".into(),
            ));
        }
        if let Some(want) = want {
            if self.ty() != Some(want) {
                return Err(data_err(format!(
                    "is {}, the slice is {want}",
                    self.ty_label()
                )));
            }
        }
        match offset {
            None if bytes != self.n_bytes() => {
                return Err(data_err(format!(
                    "holds {} bytes, the slice has {bytes}",
                    self.n_bytes()
                )));
            }
            Some(at) if at.checked_add(bytes).is_none_or(|end| end > self.n_bytes()) => {
                return Err(data_err(format!(
                    "holds {} bytes, the slice of {bytes} from byte {at} goes beyond",
                    self.n_bytes()
                )));
            }
            _ => {}
        }
        if write && is_read_only(self.buffer()) {
            return Err(GgmlError::ReadOnly {
                tensor: self.label(),
            });
        }
        Ok(())
    }

    fn ty_label(self) -> String {
        self.ty()
            .map_or_else(|| format!("type {}", self.ty_id()), |t| t.to_string())
    }

    fn write_raw(self, src: *const u8, bytes: usize, want: Option<GgmlType>) -> Result<()> {
        self.check_io(bytes, want, true)?;
        // SAFETY: the tensor is allocated in a live, writable buffer, contiguous and exactly `bytes` long; `src`
        // points to `bytes` readable bytes for the duration of the call.
        unsafe { sys::ggml_backend_tensor_set(self.as_ptr(), src.cast(), 0, bytes) };
        Ok(())
    }

    fn read_raw(self, dst: *mut u8, bytes: usize, want: Option<GgmlType>) -> Result<()> {
        self.check_io(bytes, want, false)?;
        // SAFETY: the tensor is allocated, contiguous and exactly `bytes` long; `dst` points to `bytes` writable bytes.
        unsafe { sys::ggml_backend_tensor_get(self.as_ptr(), dst.cast(), 0, bytes) };
        Ok(())
    }

    /// Copies raw bytes into the bytes `offset..offset + data.len()` of a tensor that need not be contiguous (a
    /// slot of a strided expert pool: one expert's matrix is contiguous within it).
    pub fn set_bytes_within(self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_within(offset, data.len())?;
        // SAFETY: allocated in a live, writable buffer; `offset + len` is within the bytes the tensor spans.
        unsafe {
            sys::ggml_backend_tensor_set(self.as_ptr(), data.as_ptr().cast(), offset, data.len())
        };
        Ok(())
    }

    /// [`Self::set_bytes_within`] queued on `backend` (an instance of the device whose buffer holds the tensor):
    /// returns before the copy is done where the backend queues copies (CUDA: on the instance's own stream), else
    /// after it. [`DeviceBackend::synchronize`] waits for it.
    ///
    /// # Safety
    /// `data` must stay alive and unchanged until `backend` is synchronized, and nothing may compute with these bytes
    /// of the tensor meanwhile.
    pub unsafe fn set_bytes_within_async(
        self,
        backend: &DeviceBackend,
        offset: usize,
        data: &[u8],
    ) -> Result<()> {
        self.check_within(offset, data.len())?;
        // SAFETY: allocated in a live, writable buffer of the backend's device; `offset + len` within the tensor;
        // the caller keeps `data` alive until the backend is synchronized.
        unsafe {
            sys::ggml_backend_tensor_set_async(
                backend.as_ptr(),
                self.as_ptr(),
                data.as_ptr().cast(),
                offset,
                data.len(),
            )
        };
        Ok(())
    }

    /// Checks that `len` bytes from `offset` lie within the tensor's span in a writable buffer.
    fn check_within(self, offset: usize, len: usize) -> Result<()> {
        if !self.is_allocated() || self.buffer().is_null() {
            return Err(GgmlError::Unallocated {
                tensor: self.label(),
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.n_bytes())
        {
            return Err(GgmlError::Data {
                tensor: self.label(),
                detail: format!(
                    "spans {} bytes, the slice of {len} from byte {offset} goes beyond",
                    self.n_bytes(),
                ),
            });
        }
        if is_read_only(self.buffer()) {
            return Err(GgmlError::ReadOnly {
                tensor: self.label(),
            });
        }
        Ok(())
    }

    /// Copies raw bytes into the tensor from byte `offset` on (a part of [`Self::set_bytes`], for streaming).
    pub fn set_bytes_at(self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_io_at(Some(offset), data.len(), None, true)?;
        // SAFETY: allocated in a live, writable buffer and contiguous (checked); `offset + len` within the tensor.
        unsafe {
            sys::ggml_backend_tensor_set(self.as_ptr(), data.as_ptr().cast(), offset, data.len())
        };
        Ok(())
    }

    /// Copies the tensor's bytes from byte `offset` on into `out` (a part of [`Self::get_bytes`], for streaming).
    pub fn get_bytes_at(self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_io_at(Some(offset), out.len(), None, false)?;
        // SAFETY: allocated and contiguous (checked); `offset + len` within the tensor; `out` is writable.
        unsafe {
            sys::ggml_backend_tensor_get(self.as_ptr(), out.as_mut_ptr().cast(), offset, out.len())
        };
        Ok(())
    }

    /// Copies raw bytes (any type, e.g. quantized blocks) into the tensor; the length must equal `n_bytes()`.
    pub fn set_bytes(self, data: &[u8]) -> Result<()> {
        self.write_raw(data.as_ptr(), data.len(), None)
    }

    /// Copies f32 values into an F32 tensor; the count must equal `n_elements()`.
    pub fn set_f32(self, data: &[f32]) -> Result<()> {
        self.write_raw(
            data.as_ptr().cast(),
            std::mem::size_of_val(data),
            Some(GgmlType::F32),
        )
    }

    /// Copies i32 values into an I32 tensor (row ids, positions, expert ids).
    pub fn set_i32(self, data: &[i32]) -> Result<()> {
        self.write_raw(
            data.as_ptr().cast(),
            std::mem::size_of_val(data),
            Some(GgmlType::I32),
        )
    }

    /// The tensor's bytes.
    pub fn get_bytes(self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.n_bytes()];
        self.read_raw(out.as_mut_ptr(), out.len(), None)?;
        Ok(out)
    }

    /// The values of an F32 tensor.
    pub fn get_f32(self) -> Result<Vec<f32>> {
        let n = usize::try_from(self.n_elements()).unwrap_or(0);
        let mut out = vec![0f32; n];
        self.read_raw(
            out.as_mut_ptr().cast(),
            std::mem::size_of_val(out.as_slice()),
            Some(GgmlType::F32),
        )?;
        Ok(out)
    }

    /// Copies the values of an F32 tensor into `out`, whose length must equal `n_elements()`.
    pub fn read_f32(self, out: &mut [f32]) -> Result<()> {
        self.read_raw(
            out.as_mut_ptr().cast(),
            std::mem::size_of_val(out),
            Some(GgmlType::F32),
        )
    }

    /// The values of an I32 tensor.
    pub fn get_i32(self) -> Result<Vec<i32>> {
        let n = usize::try_from(self.n_elements()).unwrap_or(0);
        let mut out = vec![0i32; n];
        self.read_raw(
            out.as_mut_ptr().cast(),
            std::mem::size_of_val(out.as_slice()),
            Some(GgmlType::I32),
        )?;
        Ok(out)
    }
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = *self;
        write!(
            f,
            "Tensor({:?} {} {:?})",
            t.name(),
            t.ty_label(),
            Tensor::ne(t)
        )
    }
}
